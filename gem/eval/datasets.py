"""Evaluation datasets read from their usual on-disk layouts (nothing is downloaded).

Semantic segmentation (`root` is the directory named in each layout):

- `voc`: VOC2012 (`VOCdevkit/VOC2012`): `JPEGImages/<id>.jpg`, `SegmentationClass/<id>.png`
  (palette PNG: 0 background, 1..20 classes, 255 ignore), ids from
  `ImageSets/Segmentation/val.txt`. 21 classes; background is predicted by thresholding.
- `context59`: Pascal Context in mmseg's converted layout: `JPEGImages/<id>.jpg`,
  `SegmentationClassContext/<id>.png` (0 ignore, 1..59 classes), ids from
  `ImageSets/SegmentationContext/val.txt`.
- `ade150`: ADEChallengeData2016: `images/validation/*.jpg`, `annotations/validation/*.png`
  (0 ignore, 1..150 classes).
- `cityscapes`: `leftImg8bit/val/<city>/<name>_leftImg8bit.png`,
  `gtFine/val/<city>/<name>_gtFine_labelTrainIds.png` (train ids 0..18, 255 ignore; made by
  cityscapesscripts' createTrainIdLabelImgs or mmseg's tools/dataset_converters).
- `coco-stuff171`: COCO-Stuff 164k in mmseg's converted layout: `images/val2017/*.jpg`,
  `annotations/val2017/*_labelTrainIds.png` (0..170, 255 ignore).

Label PNGs are read as stored (palette indices for VOC); `reduce_zero_label` layouts map
0 (and 255) to ignore and k to k-1, as mmseg. Any other value outside the classes is an
error, not ignored.

Point labels: `openimages-points`, OpenImages V7: `oidv7-val-annotations-point-labels.csv`
(`ImageId, X, Y, Label, EstimatedYesNo, ...`; X, Y normalized to [0, 1]), optional
`oidv7-class-descriptions.csv` (`LabelName, DisplayName`) for class names, images in
`validation/<ImageId>.jpg`. Per image, classes with at least one `yes` point are kept with
their `yes` (positive) and `no` (negative) points; `unsure` points are dropped.
"""

import csv
from collections import defaultdict
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

IGNORE = 255


@dataclass(frozen=True)
class Layout:
    """Where a segmentation dataset's images and labels live, and how labels map to classes."""

    name: str
    image_dir: str
    label_dir: str
    image_suffix: str
    label_suffix: str
    split_file: str | None = None  # ids, one per line; None: every image under image_dir
    reduce_zero_label: bool = False
    background: bool = False  # class 0 is background, predicted by the threshold rule


LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in [
        Layout(
            "voc",
            "JPEGImages",
            "SegmentationClass",
            ".jpg",
            ".png",
            split_file="ImageSets/Segmentation/val.txt",
            background=True,
        ),
        Layout(
            "context59",
            "JPEGImages",
            "SegmentationClassContext",
            ".jpg",
            ".png",
            split_file="ImageSets/SegmentationContext/val.txt",
            reduce_zero_label=True,
        ),
        Layout(
            "ade150",
            "images/validation",
            "annotations/validation",
            ".jpg",
            ".png",
            reduce_zero_label=True,
        ),
        Layout(
            "cityscapes",
            "leftImg8bit/val",
            "gtFine/val",
            "_leftImg8bit.png",
            "_gtFine_labelTrainIds.png",
        ),
        Layout(
            "coco-stuff171",
            "images/val2017",
            "annotations/val2017",
            ".jpg",
            "_labelTrainIds.png",
        ),
    ]
}

OPENIMAGES = "openimages-points"
OPENIMAGES_POINTS = "oidv7-val-annotations-point-labels.csv"
OPENIMAGES_CLASSES = "oidv7-class-descriptions.csv"
OPENIMAGES_IMAGES = "validation"
DATASETS = [*LAYOUTS, OPENIMAGES]


def class_names(name: str) -> list[str]:
    """The class names of segmentation dataset `name`, in label-id order."""
    text = resources.files("gem.eval").joinpath("classes", f"{name}.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


@dataclass(frozen=True)
class SegmentationSample:
    id: str
    image: Path
    label: Path


@dataclass
class SegmentationDataset:
    layout: Layout
    classes: list[str]
    samples: list[SegmentationSample]

    @property
    def name(self) -> str:
        return self.layout.name

    def read_label(self, sample: SegmentationSample) -> np.ndarray:
        """The label map `[H, W]` int64: class ids 0..C-1, `IGNORE` elsewhere."""
        return read_label(sample.label, len(self.classes), self.layout.reduce_zero_label)


def read_label(path: Path, num_classes: int, reduce_zero_label: bool = False) -> np.ndarray:
    """A label PNG as stored (palette indices, not colors) -> `[H, W]` int64 class ids with
    `IGNORE` for unlabeled pixels; values that are no class raise ValueError."""
    with Image.open(path) as image:
        if image.mode not in ("P", "L", "I", "I;16"):
            raise ValueError(f"{path}: label PNG has mode {image.mode}, expected class ids")
        raw = np.asarray(image).astype(np.int64)
    if reduce_zero_label:
        label = np.where((raw == 0) | (raw == IGNORE), IGNORE, raw - 1)  # as mmseg
    else:
        label = raw
    bad = (label >= num_classes) & (label != IGNORE)
    if bad.any():
        raise ValueError(
            f"{path}: label values {sorted(set(label[bad].tolist()))[:5]} are no class"
        )
    return label


def load_segmentation(name: str, root: str | Path) -> SegmentationDataset:
    """The samples of segmentation dataset `name` under `root` (see the module docstring)."""
    layout = LAYOUTS[name]
    root = Path(root)
    image_dir, label_dir = root / layout.image_dir, root / layout.label_dir
    for path in (image_dir, label_dir):
        if not path.is_dir():
            raise FileNotFoundError(
                f"{name}: {path} is not a directory (expected layout: "
                f"{layout.image_dir}/, {layout.label_dir}/ under --root)"
            )
    if layout.split_file:
        split = root / layout.split_file
        ids = [line.strip() for line in split.read_text().splitlines() if line.strip()]
    else:
        ids = sorted(
            str(p.relative_to(image_dir))[: -len(layout.image_suffix)]
            for p in image_dir.rglob(f"*{layout.image_suffix}")
        )
    samples = [
        SegmentationSample(
            i, image_dir / f"{i}{layout.image_suffix}", label_dir / f"{i}{layout.label_suffix}"
        )
        for i in ids
    ]
    missing = [str(p) for s in samples for p in (s.image, s.label) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{name}: {len(missing)} files missing, e.g. {missing[0]}")
    if not samples:
        raise FileNotFoundError(f"{name}: no images under {image_dir}")
    return SegmentationDataset(layout, class_names(name), samples)


@dataclass
class PointSample:
    """One image's point labels: class name -> `[(x, y, positive)]`, x and y in [0, 1]."""

    id: str
    image: Path
    points: dict[str, list[tuple[float, float, bool]]] = field(default_factory=dict)


def load_openimages_points(root: str | Path) -> list[PointSample]:
    """OpenImages V7 point labels under `root`, one sample per image with a positive point,
    sorted by image id; classes without a positive point in an image are left out there."""
    root = Path(root)
    names: dict[str, str] = {}
    descriptions = root / OPENIMAGES_CLASSES
    if descriptions.is_file():
        with descriptions.open(newline="") as f:
            names = {row["LabelName"]: row["DisplayName"] for row in csv.DictReader(f)}
    table = root / OPENIMAGES_POINTS
    if not table.is_file():
        raise FileNotFoundError(f"{OPENIMAGES}: {table} does not exist")
    points: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    with table.open(newline="") as f:
        for row in csv.DictReader(f):
            answer = row["EstimatedYesNo"].strip().lower()
            if answer not in ("yes", "no"):
                continue
            name = names.get(row["Label"]) or row.get("TextLabel") or row["Label"]
            point = (float(row["X"]), float(row["Y"]), answer == "yes")
            points[row["ImageId"]][name].append(point)
    samples = []
    for image_id in sorted(points):
        kept = {c: p for c, p in points[image_id].items() if any(pos for _, _, pos in p)}
        if kept:
            image = root / OPENIMAGES_IMAGES / f"{image_id}.jpg"
            if not image.is_file():
                raise FileNotFoundError(f"{OPENIMAGES}: image {image} does not exist")
            samples.append(PointSample(image_id, image, kept))
    return samples
