"""Tiny evaluation datasets written in each dataset's own on-disk layout (paths spelled out
here, not taken from gem.eval, so a wrong layout in the loader fails the tests).

Each writer takes `labels`: sample id -> `[H, W]` uint8 array of the values stored in the
label PNG, writes a random image of the same size and returns the root directory.
"""

import csv
from pathlib import Path

import numpy as np
from PIL import Image


def _image(path: Path, height: int, width: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)


def _label(path: Path, values: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    values = np.ascontiguousarray(values, dtype=np.uint8)
    height, width = values.shape
    image = Image.frombytes("P" if palette else "L", (width, height), values.tobytes())
    if palette:  # VOC's SegmentationClass PNGs are palette images; colours are not ids
        image.putpalette([v for i in range(256) for v in (i * 7 % 256, i * 13 % 256, 128)])
    image.save(path)


def write_voc(root: Path, labels: dict[str, np.ndarray], extra_train: bool = True) -> Path:
    """VOCdevkit/VOC2012: JPEGImages, SegmentationClass (palette PNG), val.txt; one more
    image listed only in train.txt when `extra_train`."""
    root = root / "VOCdevkit" / "VOC2012"
    items = dict(labels)
    if extra_train:
        items["2007_999999"] = np.full((8, 8), 1, np.uint8)
    for seed, (name, values) in enumerate(items.items()):
        _image(root / "JPEGImages" / f"{name}.jpg", *values.shape, seed)
        _label(root / "SegmentationClass" / f"{name}.png", values, palette=True)
    split = root / "ImageSets" / "Segmentation"
    split.mkdir(parents=True)
    (split / "val.txt").write_text("".join(f"{n}\n" for n in labels))
    (split / "train.txt").write_text("2007_999999\n" if extra_train else "")
    return root


def write_context59(root: Path, labels: dict[str, np.ndarray]) -> Path:
    """mmseg's converted Pascal Context: JPEGImages, SegmentationClassContext,
    ImageSets/SegmentationContext/val.txt."""
    root = root / "VOCdevkit" / "VOC2010"
    for seed, (name, values) in enumerate(labels.items()):
        _image(root / "JPEGImages" / f"{name}.jpg", *values.shape, seed)
        _label(root / "SegmentationClassContext" / f"{name}.png", values)
    split = root / "ImageSets" / "SegmentationContext"
    split.mkdir(parents=True)
    (split / "val.txt").write_text("".join(f"{n}\n" for n in labels))
    return root


def write_ade150(root: Path, labels: dict[str, np.ndarray]) -> Path:
    """ADEChallengeData2016: images/validation/*.jpg, annotations/validation/*.png."""
    root = root / "ADEChallengeData2016"
    for seed, (name, values) in enumerate(labels.items()):
        _image(root / "images" / "validation" / f"{name}.jpg", *values.shape, seed)
        _label(root / "annotations" / "validation" / f"{name}.png", values)
        _image(root / "images" / "training" / f"{name}_train.jpg", *values.shape, seed)
    return root


def write_cityscapes(root: Path, labels: dict[str, np.ndarray]) -> Path:
    """cityscapes: leftImg8bit/val/<city>/<name>_leftImg8bit.png and
    gtFine/val/<city>/<name>_gtFine_labelTrainIds.png (ids are `<city>/<name>`), plus the
    original `_gtFine_labelIds.png` files that must not be read."""
    root = root / "cityscapes"
    for seed, (name, values) in enumerate(labels.items()):
        _image(root / "leftImg8bit" / "val" / f"{name}_leftImg8bit.png", *values.shape, seed)
        _label(root / "gtFine" / "val" / f"{name}_gtFine_labelTrainIds.png", values)
        _label(root / "gtFine" / "val" / f"{name}_gtFine_labelIds.png", values + 7)
    return root


def write_coco_stuff(root: Path, labels: dict[str, np.ndarray]) -> Path:
    """mmseg's converted COCO-Stuff 164k: images/val2017/*.jpg,
    annotations/val2017/*_labelTrainIds.png."""
    root = root / "coco_stuff164k"
    for seed, (name, values) in enumerate(labels.items()):
        _image(root / "images" / "val2017" / f"{name}.jpg", *values.shape, seed)
        _label(root / "annotations" / "val2017" / f"{name}_labelTrainIds.png", values)
    return root


OI_HEADER = [
    "ImageId",
    "X",
    "Y",
    "Label",
    "EstimatedYesNo",
    "Source",
    "YesVotes",
    "NoVotes",
    "UnsureVotes",
    "TextLabel",
]


def write_openimages(
    root: Path,
    sizes: dict[str, tuple[int, int]],
    points: list[tuple[str, float, float, str, str]],
    classes: dict[str, str],
) -> Path:
    """OpenImages V7: validation/<id>.jpg of `sizes` (h, w), the point-label CSV from
    `points` rows (image id, x, y, label MID, yes/no/unsure) and the class descriptions."""
    root = root / "openimages"
    for seed, (image_id, (h, w)) in enumerate(sizes.items()):
        _image(root / "validation" / f"{image_id}.jpg", h, w, seed)
    with (root / "oidv7-val-annotations-point-labels.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(OI_HEADER)
        for image_id, x, y, mid, answer in points:
            writer.writerow([image_id, x, y, mid, answer, "ih", 1, 0, 0, ""])
    with (root / "oidv7-class-descriptions.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["LabelName", "DisplayName"])
        writer.writerows(classes.items())
    return root
