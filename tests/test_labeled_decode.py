"""Labeled shards as a user decodes them.

One real run (tiny model, a 300-class vocabulary, a JPEG stored with EXIF orientation 6
among upright images), filtered to the classes whose ids are above 255, written as labeled
shards: the images are stored oriented as labeled (a plain decode, no `exif_transpose`, has
the masks' size), and `seg.png` keeps ids above 255 through the project's loader and
through the README's webdataset recipe; `webdataset.decode("pil")` loses them (the pitfall
the README warns about).
"""

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import ExifTags, Image, ImageOps

from pipeline.config import RunConfig
from pipeline.run import run
from pipeline.tools.filter import FilterSpec, filter_output
from pipeline.tools.labeled_shards import (
    LABELS_MEMBER,
    SEG_MEMBER,
    decode_png,
    iter_samples,
    write_labeled_shards,
)
from pipeline.tools.loader import decode_sample, labeled_dataset
from tests.shards import image_bytes, write_shard

pytestmark = pytest.mark.slow
CLASSES = [f"thing {i}" for i in range(300)]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(ray_local, tmp_path_factory):
    """Labeled shards of a run whose masks are all of classes with ids 256-299."""
    root = tmp_path_factory.mktemp("decode")
    rotated = image_bytes(64, 32, "jpeg", seed=7, exif_orientation=6)  # shown 32 x 64
    samples = [("rot6", {"jpg": rotated, "txt": b"rotated"})]
    samples += [(f"up{i}", {"jpg": image_bytes(48, 40, seed=i)}) for i in range(3)]
    samples.append(("png0", {"png": image_bytes(40, 30, "png", seed=9)}))
    source = write_shard(root / "src" / "shard-000000.tar", samples)
    (root / "vocab.txt").write_text("\n".join(CLASSES) + "\n")
    out = str(root / "out")
    config = RunConfig(
        inputs=[source],
        vocab=str(root / "vocab.txt"),
        out=out,
        model="gemlabel-tiny",
        pretrained="random",
        image_size=64,
        top_k=60,
    )
    assert run(config).status == "complete"
    high = str(root / "high")
    filter_output(out, high, FilterSpec(classes=tuple(CLASSES[256:])))
    dest = root / "shards"
    manifest = write_labeled_shards(high, str(dest), include_unlabeled=True)
    assert manifest["status"] == "complete" and manifest["id_map"]["bits"] == 16
    urls = sorted(str(p) for p in dest.glob("*.tar"))
    return {"source": source, "urls": urls, "manifest": manifest}


def labeled_samples(urls: list[str]) -> dict[str, dict[str, bytes]]:
    return {key: dict(members) for url in urls for key, members in iter_samples(url)}


def test_images_are_stored_oriented_as_labeled(shards):
    """Decoded plainly (no exif_transpose), each labeled image has its masks' size; an EXIF
    rotated JPEG is re-encoded upright, every other member keeps its bytes."""
    written = labeled_samples(shards["urls"])
    source = {key: dict(members) for key, members in iter_samples(shards["source"])}
    assert set(written) == set(source)
    for key, members in written.items():
        info = json.loads(members[LABELS_MEMBER])
        ext = "png" if "png" in source[key] else "jpg"
        plain = Image.open(io.BytesIO(members[ext]))  # what a plain decoder sees
        seg = decode_png(members[SEG_MEMBER])
        assert plain.size == (info["width"], info["height"]) == (seg.shape[1], seg.shape[0])
        for ann in info["annotations"]:
            assert ann["segmentation"]["size"] == [info["height"], info["width"]]
        if key == "rot6":
            assert info["orientation"] == 6 and plain.size == (32, 64)
            assert plain.format == "JPEG"
            assert plain.getexif().get(ExifTags.Base.Orientation, 1) == 1
            # the pixels a viewer showed for the source, within one more JPEG round trip
            shown = ImageOps.exif_transpose(Image.open(io.BytesIO(source[key][ext])))
            diff = np.abs(np.asarray(plain, np.int16) - np.asarray(shown.convert("RGB"), np.int16))
            assert diff.mean() < 3, diff.mean()
            assert members["txt"] == source[key]["txt"]
        else:
            assert info["orientation"] == 1
            assert {k: members[k] for k in source[key]} == source[key]  # bytes unchanged
    stats = next(iter(shards["manifest"]["shards"].values()))
    assert stats["reoriented"] == 1 and stats["unoriented"] == 0


def test_upright_keeps_upright_bytes_and_turns_png():
    from pipeline.tools.labeled_shards import upright

    plain = image_bytes(30, 20, "png", seed=3)
    assert upright(plain) == (plain, 1)
    turned, orientation = upright(image_bytes(30, 20, "png", seed=3, exif_orientation=8))
    image = Image.open(io.BytesIO(turned))
    assert orientation == 8 and image.size == (20, 30) and image.format == "PNG"
    expected = np.asarray(Image.open(io.BytesIO(plain)).transpose(Image.Transpose.ROTATE_90))
    assert (np.asarray(image) == expected).all()  # lossless for PNG
    with pytest.raises(ValueError, match="labeled size"):
        upright(image_bytes(30, 20, "png", seed=3, exif_orientation=8), size=(30, 20))


def readme_recipe() -> str:
    """The README's webdataset recipe for labeled shards (the block that defines seg_png)."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    recipes = [b for b in blocks if "def seg_png" in b]
    assert len(recipes) == 1, "README: one python block with the seg.png decode recipe"
    return recipes[0]


def test_seg_png_keeps_ids_above_255(shards):
    """The loader and the README recipe keep 16-bit ids; decode("pil") does not."""
    urls = shards["urls"]
    written = labeled_samples(urls)
    stored = {k: decode_png(m[SEG_MEMBER]) for k, m in written.items()}
    assert stored and all(s.dtype == np.uint16 for s in stored.values())
    high = max(int(s.max()) for s in stored.values())
    assert high > 256, "the run must label classes with ids above 255"

    # the project's loader: decode_sample and the dataset built on it
    for key, members in written.items():
        _, target = decode_sample(members, image_size=(64, 64))
        assert set(np.unique(target.numpy())) <= set(np.unique(stored[key]))
    assert max(int(t.max()) for _, t in labeled_dataset(urls, image_size=32)) > 256

    # the README's recipe, run as written
    scope = {"urls": urls}
    exec(readme_recipe(), scope)  # noqa: S102 - the documentation's own code
    decoded = {s["__key__"]: s for s in scope["dataset"]}
    assert set(decoded) == set(written)
    for key, sample in decoded.items():
        assert sample["seg.png"].dtype == np.uint16
        assert (sample["seg.png"] == stored[key]).all()
        info = sample["labels.json"]
        assert sample["seg.png"].shape == (info["height"], info["width"])
    assert max(int(s["seg.png"].max()) for s in decoded.values()) == high

    # the pitfall: webdataset's "pil" decoder converts the 16-bit map to 8-bit RGB
    pil = {
        s["__key__"]: s["seg.png"] for s in wds.WebDataset(urls, shardshuffle=False).decode("pil")
    }
    assert max(int(np.asarray(p).max()) for p in pil.values()) <= 255
    assert any(not (np.asarray(pil[k])[..., 0] == stored[k]).all() for k in stored)
