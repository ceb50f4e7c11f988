"""gem.eval.datasets: each loader on a tiny dataset written in that dataset's own layout."""

import numpy as np
import pytest
from PIL import Image

from gem.eval import class_names, load_openimages_points, load_segmentation
from gem.eval.datasets import IGNORE
from tests.eval_data import (
    write_ade150,
    write_cityscapes,
    write_coco_stuff,
    write_context59,
    write_openimages,
    write_voc,
)


def stored(*rows):
    return np.array(rows, dtype=np.uint8)


def check(dataset, expected: dict[str, np.ndarray]) -> None:
    """Samples in order, images and labels paired and of equal size, labels as expected."""
    assert [s.id for s in dataset.samples] == list(expected)
    for sample in dataset.samples:
        label = dataset.read_label(sample)
        np.testing.assert_array_equal(label, expected[sample.id])
        with Image.open(sample.image) as image:
            assert (image.height, image.width) == label.shape


def test_class_lists():
    sizes = {"voc": 21, "context59": 59, "ade150": 150, "cityscapes": 19, "coco-stuff171": 171}
    for name, size in sizes.items():
        names = class_names(name)
        assert len(names) == size and len(set(names)) == size, name
    assert class_names("voc")[0] == "background" and class_names("voc")[15] == "person"
    assert class_names("context59")[0] == "aeroplane" and class_names("context59")[-1] == "wood"
    assert class_names("ade150")[:3] == ["wall", "building", "sky"]
    assert class_names("ade150")[-1] == "flag"
    assert class_names("cityscapes")[11] == "person"
    assert class_names("coco-stuff171")[0] == "person" and class_names("coco-stuff171")[80] == (
        "banner"
    )


def test_voc_palette_ids_ignore_and_val_split(tmp_path):
    label = stored([0, 3, 3], [255, 20, 0])
    root = write_voc(tmp_path, {"2007_000032": label, "2007_000039": stored([15, 15])})
    data = load_segmentation("voc", root)
    assert data.layout.background and data.classes[3] == "bird"
    # palette indices (not colours) are the ids; train-only images are not in val
    check(data, {"2007_000032": label, "2007_000039": stored([15, 15])})


def test_context59_zero_is_ignore_and_ids_shift(tmp_path):
    root = write_context59(tmp_path, {"2008_000002": stored([0, 1, 59], [2, 0, 33])})
    data = load_segmentation("context59", root)
    assert not data.layout.background and len(data.classes) == 59
    check(data, {"2008_000002": stored([IGNORE, 0, 58], [1, IGNORE, 32])})
    assert data.classes[0] == "aeroplane" and data.classes[58] == "wood"


def test_ade150_zero_is_ignore_and_validation_only(tmp_path):
    labels = {"ADE_val_00000002": stored([150, 1]), "ADE_val_00000001": stored([0, 12, 255])}
    root = write_ade150(tmp_path, labels)
    data = load_segmentation("ade150", root)
    # 255 stays ignore (mmseg's reduce_zero_label does the same)
    expected = {
        "ADE_val_00000001": stored([IGNORE, 11, IGNORE]),
        "ADE_val_00000002": stored([149, 0]),
    }
    check(data, expected)
    assert data.classes[149] == "flag"


def test_cityscapes_train_ids_nested_cities(tmp_path):
    labels = {
        "munster/munster_000000_000019": stored([0, 18, 255]),
        "frankfurt/frankfurt_000000_000294": stored([11, 13, 2]),
    }
    root = write_cityscapes(tmp_path, labels)
    data = load_segmentation("cityscapes", root)
    check(data, dict(sorted(labels.items())))
    assert data.samples[0].label.name == "frankfurt_000000_000294_gtFine_labelTrainIds.png"


def test_coco_stuff171_train_ids(tmp_path):
    labels = {"000000000139": stored([0, 170], [255, 80])}
    root = write_coco_stuff(tmp_path, labels)
    data = load_segmentation("coco-stuff171", root)
    check(data, labels)
    assert data.classes[80] == "banner"


def test_label_values_that_are_no_class_raise(tmp_path):
    root = write_context59(tmp_path, {"a": stored([60, 1])})  # context59 ids are 0..59
    data = load_segmentation("context59", root)
    with pytest.raises(ValueError, match="no class"):
        data.read_label(data.samples[0])


def test_missing_files_raise(tmp_path):
    root = write_voc(tmp_path, {"a": stored([1])}, extra_train=False)
    (root / "SegmentationClass" / "a.png").unlink()
    with pytest.raises(FileNotFoundError, match="a.png"):
        load_segmentation("voc", root)
    with pytest.raises(FileNotFoundError, match="JPEGImages"):
        load_segmentation("voc", tmp_path / "nowhere")


def test_openimages_points(tmp_path):
    root = write_openimages(
        tmp_path,
        {"img1": (20, 30), "img2": (10, 10), "img3": (10, 10)},
        [
            ("img1", 0.5, 0.25, "/m/cat", "yes"),
            ("img1", 0.1, 0.9, "/m/cat", "no"),
            ("img1", 0.2, 0.2, "/m/cat", "unsure"),
            ("img1", 0.3, 0.3, "/m/dog", "no"),  # no positive point: not evaluated here
            ("img2", 0.0, 1.0, "/m/dog", "yes"),
            ("img3", 0.5, 0.5, "/m/cat", "no"),  # image without positives: left out
        ],
        {"/m/cat": "Cat", "/m/dog": "Dog"},
    )
    samples = load_openimages_points(root)
    assert [s.id for s in samples] == ["img1", "img2"]
    assert samples[0].points == {"Cat": [(0.5, 0.25, True), (0.1, 0.9, False)]}
    assert samples[1].points == {"Dog": [(0.0, 1.0, True)]}
    assert samples[0].image == root / "validation" / "img1.jpg"
