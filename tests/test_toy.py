"""The toy world: scenes, the bundled gemlabel-toy model, and the synthetic benchmark
(the whole pipeline scored against exact masks), gallery and COCO export on its output."""

import io
import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

import gem
from gem.factory import BUNDLED_WEIGHTS
from gem.toy.scenes import CLASSES, label_map_from_json, render_scene, scene_sample
from pipeline.stages.decode import decode_image

# The goal for the bundled toy model on the 32-scene benchmark below (gem 0.512 when it was
# committed); a transposed mask, a resize slip or a wrong RLE order drops it below this.
MIN_GEM_MIOU = 0.50


def test_scenes_are_seeded_and_masks_exact():
    a, b = render_scene(3, 7, 90, 70), render_scene(3, 7, 90, 70)
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0])) and a[2] == b[2]
    assert a[1].shape == (70, 90) and a[1].max() < len(CLASSES)
    for name in {CLASSES[c] for c in np.unique(a[1]) if c >= 0}:
        assert name in a[2]


def test_exif_sample_decodes_to_the_scene():
    key, members = scene_sample(0, 5, 64, 160, exif_fraction=1.0)
    truth = json.loads(members["json"])
    stored = Image.open(io.BytesIO(members["jpg"]))
    assert stored.size == (truth["height"], truth["width"])  # stored rotated
    image = decode_image(members["jpg"])
    reference, label_map, _ = render_scene(0, 5, truth["width"], truth["height"])
    assert image.size == reference.size
    assert np.abs(np.asarray(image, int) - np.asarray(reference, int)).mean() < 4
    assert np.array_equal(label_map_from_json(truth), label_map)


def test_bundled_toy_model_loads_without_pretrained():
    # a few MB: records deflated, unused token-embedding rows zeroed
    assert BUNDLED_WEIGHTS["gemlabel-toy"].stat().st_size < 4 << 20
    model = gem.create_gem_model("gemlabel-toy")
    text = model.encode_text(["red circle", "blue square"])
    assert text.shape == (2, 128) and not torch.allclose(text[0], text[1], atol=1e-4)


def test_training_is_reproducible(tmp_path):
    """Two short trainings from the same seed give the same checkpoint, bit for bit; it
    loads through the normal path, trained rows only in the token embedding."""
    from gem.toy import train

    args = ["--steps", "3", "--scenes", "12", "--batch", "4", "--gem-batch", "2"]
    args += ["--eval-scenes", "2"]
    paths = [str(tmp_path / f"{i}.pt") for i in range(2)]
    for path in paths:
        train.main([*args, "--out", path])
    assert Path(paths[0]).read_bytes() == Path(paths[1]).read_bytes()
    with zipfile.ZipFile(paths[0]) as archive:
        assert {i.compress_type for i in archive.infolist()} == {zipfile.ZIP_DEFLATED}
    first, second = (torch.load(p, weights_only=True) for p in paths)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    rows = first["token_embedding.weight"].abs().sum(1) > 0
    tokenizer = open_clip.get_tokenizer("gemlabel-toy")
    assert rows[tokenizer(["a photo of a red circle."])[0]].all()
    assert 10 < int(rows.sum()) < 200
    model, _ = gem.create_clip("gemlabel-toy", pretrained=paths[0])
    assert torch.equal(model.token_embedding.weight.half(), first["token_embedding.weight"])


@pytest.mark.parametrize("gem_batch", ["0", "5"])
def test_training_rejects_a_gem_batch_outside_the_batch(gem_batch, capsys):
    from gem.toy import train

    with pytest.raises(SystemExit):
        train.main(["--batch", "4", "--gem-batch", gem_batch, "--out", "unused.pt"])
    assert f"--gem-batch must be in [1, --batch=4], got {gem_batch}" in capsys.readouterr().err


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory):
    from benchmarks.toy_benchmark import run_benchmark

    work = str(tmp_path_factory.mktemp("toy"))
    return work, run_benchmark(work, count=32, methods=["gem"], num_cpus=2)


@pytest.mark.slow
def test_toy_benchmark_miou_does_not_drop(benchmark):
    _, results = benchmark
    assert results["gem"]["images"] == 32
    assert results["gem"]["miou"] >= MIN_GEM_MIOU


@pytest.mark.slow
def test_gallery_shows_what_the_source_still_has(benchmark, tmp_path):
    """Samples missing from the source or past its damage become items without pixels (the
    damage is noted); every image still gets exactly one item."""
    from pipeline.tools.gallery import write_gallery

    work, _ = benchmark
    shard = Path(work) / "shards" / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
        partial = tmp_path / "partial" / shard.name
        partial.parent.mkdir()
        with tarfile.open(partial, "w") as out:
            for info in members[:20]:  # the first 10 samples: image and json each
                out.addfile(info, tar.extractfile(info))
    damaged = tmp_path / "damaged" / shard.name
    damaged.parent.mkdir()
    damaged.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    for source, pictures in ((partial, 10), (damaged, None)):
        paths = write_gallery(
            f"{work}/out-gem", str(tmp_path / source.parent.name), [str(source)], 10
        )
        pages = "".join(Path(p).read_text() for p in paths)
        assert len(paths) == 4 and pages.count('class="item"') == 32
        shown = pages.count("data:image/png;base64,")
        assert pages.count("(no pixels: not read from the source)") == 32 - shown
        if pictures is not None:
            assert shown == pictures and "missing pixels" not in pages
        else:
            assert 0 < shown < 32 and pages.count("missing pixels: ") == 1


@pytest.mark.slow
def test_gallery_and_coco_export(benchmark, tmp_path):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    from jobs.cli import main
    from pipeline.storage.output import MASKS_DIR
    from pipeline.storage.tables import read_table

    work, _ = benchmark
    out = f"{work}/out-gem"
    assert main(["view", out, "--dest", str(tmp_path / "g"), "--per-page", "20"]) == 0
    pages = sorted(p.name for p in (tmp_path / "g").iterdir())
    assert pages == ["index.html", "page-2.html"]
    first = (tmp_path / "g" / "index.html").read_text()
    assert first.count('class="item"') == 20 and "data:image/png;base64," in first
    assert "http://" not in first and "https://" not in first
    assert main(["export", "coco", out, str(tmp_path / "coco.json")]) == 0
    coco = COCO(str(tmp_path / "coco.json"))
    masks = read_table(out, MASKS_DIR).to_pylist()
    kept = [m for m in masks if m["area"] > 0]
    assert len(coco.getImgIds()) == 32 and len(coco.getAnnIds()) == len(kept)
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == CLASSES
    ann = coco.loadAnns(coco.getAnnIds())[0]
    image = coco.loadImgs(ann["image_id"])[0]
    row = next(
        m
        for m in kept
        if m["key"] == image["file_name"].rsplit(".", 1)[0]  # the key + the image's extension
        and m["label_id"] + 1 == ann["category_id"]
    )
    expected = mask_utils.decode(dict(row["mask"], counts=row["mask"]["counts"].encode()))
    assert np.array_equal(coco.annToMask(ann), expected)
