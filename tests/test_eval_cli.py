"""`gemlabel eval` end to end with the tiny model (seeded random weights) on generated
datasets: exit codes, the printed table, the JSON results."""

import json
import math

import numpy as np
import pytest

from jobs.cli import main
from tests.eval_data import write_ade150, write_openimages, write_voc

MODEL = ["--model", "gemlabel-tiny", "--device", "cpu"]


def voc_labels():
    """Two 24 x 40 images (a 3 x 5 patch grid at patch 8): an object on the top-left
    2 x 3 patches, background elsewhere, one ignored row."""
    labels = {}
    for name, cls in (("2007_000001", 15), ("2007_000002", 8)):
        label = np.zeros((24, 40), np.uint8)
        label[:16, :24] = cls
        label[23] = 255
        labels[name] = label
    return labels


def test_eval_voc_all_background_with_analysis(tmp_path, capsys):
    """A threshold above 1 makes every pixel background, which fixes the scores: background
    IoU = background pixels / valid pixels, present classes 0, absent classes undefined."""
    labels = voc_labels()
    root = write_voc(tmp_path, labels)
    out = tmp_path / "res" / "voc.json"
    args = ["eval", "--dataset", "voc", "--root", str(root), *MODEL, "--short-side", "24"]
    code = main([*args, "--background-threshold", "1.01", "--analysis", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "background" in printed and "person" in printed
    result = json.loads(out.read_text())
    valid = sum(int((v != 255).sum()) for v in labels.values())
    background = sum(int((v == 0).sum()) for v in labels.values())
    iou = result["per_class_iou"]
    assert len(iou) == 21 and result["counts"]["images"] == 2
    assert result["counts"]["pixels"] == valid
    assert iou["background"] == pytest.approx(background / valid)
    assert iou["person"] == 0 and iou["cat"] == 0
    assert sum(v is None for v in iou.values()) == 18
    assert result["miou"] == pytest.approx((background / valid) / 3)
    assert result["model"] == "gemlabel-tiny" and result["method"]["method"] == "gem"
    assert result["protocol"]["short_side"] == 24 and result["background_threshold"] == 1.01
    analysis = result["analysis"]
    assert analysis["images"] == 2 and analysis["masks"] == 2  # one object per image
    for key in ("object_background_contrast", "text_object_background_contrast"):
        assert -1 <= analysis[key] <= 1
    assert -1 <= analysis["patch_patch_similarity"] <= 1


def test_eval_ade150_sliding_limit(tmp_path):
    labels = {
        f"ADE_val_{i:08d}": np.random.default_rng(i).integers(0, 151, (20, 28)).astype(np.uint8)
        for i in (1, 2)
    }
    root = write_ade150(tmp_path, labels)
    out = tmp_path / "ade.json"
    args = ["eval", "--dataset", "ade150", "--root", str(root), *MODEL, "--method", "clip"]
    sliding = ["--protocol", "sliding", "--short-side", "20", "--window", "16", "--stride", "8"]
    assert main([*args, *sliding, "--limit", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["protocol"] == {
        "name": "sliding",
        "short_side": 20,
        "window": 16,
        "stride": 8,
        "max_long_side": 2048,
        "pad": "end",
    }
    first = labels["ADE_val_00000001"]
    assert result["counts"]["images"] == 1
    assert result["counts"]["pixels"] == int((first != 0).sum())
    assert result["method"]["method"] == "clip" and len(result["per_class_iou"]) == 150
    defined = [v for v in result["per_class_iou"].values() if v is not None]
    assert result["miou"] == pytest.approx(sum(defined) / len(defined))


def test_eval_openimages_points(tmp_path):
    root = write_openimages(
        tmp_path,
        {"a1": (24, 32), "b2": (32, 24)},
        [
            ("a1", 0.1, 0.1, "/m/cat", "yes"),
            ("a1", 0.9, 0.9, "/m/cat", "no"),
            ("b2", 0.5, 0.5, "/m/dog", "yes"),
            ("b2", 0.5, 0.5, "/m/cat", "unsure"),
        ],
        {"/m/cat": "cat", "/m/dog": "dog"},
    )
    out = tmp_path / "oi.json"
    args = ["eval", "--dataset", "openimages-points", "--root", str(root), *MODEL]
    assert main([*args, "--short-side", "24", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["counts"] == {"images": 2, "classes": 2, "points": 3}
    # dog: one positive point -> IoU 0 or 1; cat: TP/(TP+FP+FN) of 1 positive, 1 negative
    assert result["per_class_iou"]["dog"] in (0.0, 1.0)
    assert result["per_class_iou"]["cat"] in (0.0, 0.5, 1.0)
    assert not math.isnan(result["miou"])


def test_eval_usage_errors(tmp_path, capsys):
    base = ["eval", "--root", str(tmp_path / "missing"), *MODEL]
    assert main([*base, "--dataset", "voc"]) == 2
    assert "JPEGImages" in capsys.readouterr().err
    assert main([*base, "--dataset", "openimages-points", "--protocol", "sliding"]) == 2
    assert "paper protocol" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main([*base, "--dataset", "imagenet"])
    assert exit_info.value.code == 2
