"""`gemlabel export coco` of a real run, opened as COCO tools open it: pycocotools loads the
JSON, every image's `file_name` (the key with the extension stored in its shard) resolves
to a readable file written by `--write-images` (EXIF orientation applied: the size of the
masks), relative to the JSON's directory or to `--images-root`; `shard` is the shard as the
user gave it. The naming rule itself is checked on rows alone."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from jobs.cli import main
from pipeline.tools.coco import file_names
from tests.shards import image_bytes, write_shard

CLI_SMALL = ["--model", "gemlabel-tiny", "--pretrained", "random", "--image-size", "32"]
CLI_SMALL += ["--top-k", "3"]


@pytest.fixture(scope="module")
def labeled(ray_local, tmp_path_factory):
    """Two shards given as relative paths, one through a brace range: JPEG (one EXIF-rotated),
    PNG and WebP images; the key 000001 in both shards."""
    root = tmp_path_factory.mktemp("coco")
    (root / "vocab.txt").write_text("cat\ndog\ncar\ntree\n")
    write_shard(
        root / "src" / "a-0.tar",
        [
            ("000000", {"jpg": image_bytes(40, 24, "jpeg", exif_orientation=6), "cls": b"1"}),
            ("000001", {"png": image_bytes(30, 20, "png", seed=1)}),
        ],
    )
    write_shard(
        root / "src" / "b.tar",
        [("000001", {"webp": image_bytes(26, 18, "webp", seed=2)})],
    )
    cwd = os.getcwd()
    os.chdir(root)
    try:
        args = ["run", "src/a-{0..0}.tar", "src/b.tar", "--vocab", "vocab.txt", "--out", "out"]
        assert main([*args, *CLI_SMALL]) == 0
    finally:
        os.chdir(cwd)
    return root


@pytest.mark.slow
def test_coco_export_opens_with_pycocotools_and_its_images(labeled, tmp_path, capsys):
    path = tmp_path / "export" / "labels.json"
    images = tmp_path / "export" / "images"
    args = ["export", "coco", str(labeled / "out"), str(path), "--write-images", str(images)]
    assert main(args) == 0
    assert "3 images" in capsys.readouterr().out
    coco = COCO(str(path))
    entries = coco.loadImgs(coco.getImgIds())
    assert sorted(e["file_name"] for e in entries) == [
        "images/a-0/000000.jpg",
        "images/a-0/000001.png",
        "images/b/000001.webp",
    ]
    assert {e["shard"] for e in entries} == {"src/a-0.tar", "src/b.tar"}  # as the user gave them
    for entry in entries:
        with Image.open(path.parent / entry["file_name"]) as picture:
            picture.load()
            assert picture.size == (entry["width"], entry["height"])
            assert (
                picture.format
                == {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[
                    entry["file_name"].rsplit(".", 1)[1]
                ]
            )
    rotated = next(e for e in entries if e["file_name"].endswith(".jpg"))
    assert (rotated["width"], rotated["height"]) == (24, 40)  # EXIF orientation 6 applied
    anns = coco.loadAnns(coco.getAnnIds())
    assert anns and all(a["area"] > 0 for a in anns)
    for ann in anns:
        entry = coco.loadImgs(ann["image_id"])[0]
        mask = coco.annToMask(ann)
        assert mask.shape == (entry["height"], entry["width"]) and mask.sum() == ann["area"]
    png = next(e for e in entries if e["file_name"].endswith(".png"))
    source = np.asarray(Image.open(path.parent / png["file_name"]).convert("RGB"))
    assert source.shape == (20, 30, 3)


@pytest.mark.slow
def test_coco_file_names_without_images_and_with_an_images_root(labeled, tmp_path):
    bare = tmp_path / "bare.json"
    assert main(["export", "coco", str(labeled / "out"), str(bare)]) == 0
    names = sorted(e["file_name"] for e in json.loads(bare.read_text())["images"])
    assert names == ["a-0/000000.jpg", "a-0/000001.png", "b/000001.webp"]
    assert not (tmp_path / "images").exists()

    path = tmp_path / "json" / "labels.json"
    images = tmp_path / "pictures"
    args = ["export", "coco", str(labeled / "out"), str(path), "--write-images", str(images)]
    assert main([*args, "--images-root", str(tmp_path)]) == 0
    entries = json.loads(path.read_text())["images"]
    assert sorted(e["file_name"] for e in entries) == [
        "pictures/a-0/000000.jpg",
        "pictures/a-0/000001.png",
        "pictures/b/000001.webp",
    ]
    assert all(Path(tmp_path, e["file_name"]).is_file() for e in entries)


def test_file_names_are_keys_with_their_extension():
    rows = [{"shard": "/d/a.tar", "key": "1"}, {"shard": "/d/b.tar.gz", "key": "2"}]
    names = file_names(rows, {("/d/a.tar", "1"): "jpg", ("/d/b.tar.gz", "2"): "webp"})
    assert names == {("/d/a.tar", "1"): "1.jpg", ("/d/b.tar.gz", "2"): "2.webp"}


def test_file_names_of_keys_in_several_shards_are_below_the_shard_name():
    rows = [
        {"shard": "s3://b/x/a-0.tar", "key": "000001"},
        {"shard": "/d/b.tar.gz", "key": "000001"},
        {"shard": "/d/b.tar.gz", "key": "000002"},
    ]
    names = file_names(rows, {("s3://b/x/a-0.tar", "000001"): "png"})
    assert names == {  # the repeated key puts every name below its shard's
        ("s3://b/x/a-0.tar", "000001"): "a-0/000001.png",
        ("/d/b.tar.gz", "000001"): "b/000001",  # no extension known: the bare key
        ("/d/b.tar.gz", "000002"): "b/000002",
    }
