"""The official presets of SCLIP, ClearCLIP and NACLIP (the tables of docs/ovss.md
section 6, spelled out here) and that `gemlabel eval` applies them as written: windows,
short side, padding, templates, background queries, logit scale, thresholds, PAMR; the
saved label PNGs."""

import importlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from gem.eval import PRESETS, get_preset
from gem.eval.datasets import read_label
from gem.eval.presets import STUFF_BACKGROUND, query_labels
from jobs.cli import main
from tests.eval_data import write_ade150, write_voc

evaluate_module = importlib.import_module("gem.eval.evaluate")  # gem.eval.evaluate: the function

STUFF = "sky wall tree wood grass road sea river mountain sands desk bed building cloud lamp "
STUFF += "door window wardrobe ceiling shelf curtain stair floor hill rail fence"

# method -> dataset -> (short side, window, stride, logit scale, prob thd, area thd, PAMR)
TABLES = {
    "sclip": {
        "voc": (336, 224, 112, 65, 0.1, 0.1, None),
        "context59": (336, 224, 112, 40, 0.0, None, None),
        "ade150": (336, 224, 112, 40, 0.0, None, None),
        "coco-stuff171": (448, 224, 112, 40, 0.0, None, None),
        "cityscapes": (560, 224, 112, 40, 0.0, None, None),
    },
    "clearclip": {
        "voc": (448, 448, 224, 50, 0.5, None, None),
        "context59": (448, 448, 224, 50, 0.0, None, None),
        "ade150": (448, 448, 224, 50, 0.0, None, None),
        "coco-stuff171": (448, 448, 224, 50, 0.0, None, None),
        "cityscapes": (448, 224, 224, 50, 0.0, None, None),
    },
    "naclip": {
        "voc": (336, None, None, 40, 0.1, None, "pamr"),
        "context59": (336, 224, 112, 40, 0.0, None, "pamr"),
        "ade150": (336, 224, 112, 40, 0.0, None, "pamr"),
        "coco-stuff171": (336, 224, 112, 40, 0.0, None, "pamr"),
        "cityscapes": (560, 224, 112, 40, 0.0, None, "pamr"),
    },
}


def test_presets_are_the_tables():
    assert STUFF_BACKGROUND == tuple(STUFF.split())
    assert set(PRESETS) == set(TABLES)
    for method, rows in TABLES.items():
        assert set(PRESETS[method]) == set(rows)
        for dataset, row in rows.items():
            p = get_preset(method, dataset)
            got = (p.short_side, p.window, p.stride, p.logit_scale, p.prob_threshold)
            assert (*got, p.area_threshold, p.refine) == row, (method, dataset)
            assert p.templates == "imagenet"
            assert p.pad == ("centre" if method == "clearclip" else "none")
            background = {"clearclip": ("background",)}.get(method, STUFF_BACKGROUND)
            assert p.background == (background if dataset == "voc" else ())
    with pytest.raises(ValueError, match="no official presets"):
        get_preset("gem", "voc")


def test_query_labels():
    """Each class takes its best query; the area rule drops a class on at most 10% of the
    foreground pixels; a top probability under the threshold is class 0."""
    scores = torch.zeros(4, 1, 14)  # queries: background x2, class 1, class 2
    scores[0, 0, :2] = 1  # background (first query)
    scores[1, 0, 2:3] = 1  # background (second query)
    scores[2, 0, 3:13] = 1  # class 1 on 10 pixels
    scores[3, 0, 13] = 1  # class 2 on 1 pixel: 1/11 of the foreground
    query_class = torch.tensor([0, 0, 1, 2])
    labels = query_labels(scores, query_class, 3, logit_scale=50)
    assert labels[0].tolist() == [0, 0, 0] + [1] * 10 + [2]
    labels = query_labels(scores, query_class, 3, logit_scale=50, area_threshold=0.1)
    assert labels[0].tolist() == [0, 0, 0] + [1] * 10 + [0]
    labels = query_labels(scores, query_class, 3, logit_scale=50, area_threshold=0.09)
    assert labels[0, -1] == 2
    # at logit scale 1 every probability is ~0.3: all under 0.5 -> class 0
    assert query_labels(scores, query_class, 3, 1.0, prob_threshold=0.5).eq(0).all()


def voc_labels():
    label = np.zeros((30, 44), np.uint8)
    label[:16, :24] = 15
    label[29] = 255
    return {"2007_000001": label}


class Spy:
    """Records the evaluation's calls of the library while running them."""

    def __init__(self, monkeypatch):
        self.calls = {"sliding": [], "pamr": [], "labels": [], "text": []}
        for name in ("sliding_logits", "pamr", "query_labels"):
            original = getattr(evaluate_module, name)
            monkeypatch.setattr(evaluate_module, name, self._wrap(name, original))
        original_text = evaluate_module.GEM.encode_text
        spy = self

        def encode_text(model, names, templates="single"):
            spy.calls["text"].append((list(names), templates))
            return original_text(model, names, templates)

        monkeypatch.setattr(evaluate_module.GEM, "encode_text", encode_text)

    def _wrap(self, name, original):
        key = {"sliding_logits": "sliding", "query_labels": "labels"}.get(name, name)

        def call(*args, **kwargs):
            self.calls[key].append((args, kwargs))
            return original(*args, **kwargs)

        return call


MODEL = ["--model", "gemlabel-tiny", "--device", "cpu"]


@pytest.mark.parametrize("method", ["sclip", "clearclip", "naclip"])
def test_voc_presets_are_applied(tmp_path, monkeypatch, method):
    spy = Spy(monkeypatch)
    root = write_voc(tmp_path, voc_labels())
    out, saved = tmp_path / "r.json", tmp_path / "pred"
    args = ["eval", "--dataset", "voc", "--root", str(root), *MODEL, "--method", method]
    assert main([*args, "--out", str(out), "--save-predictions", str(saved)]) == 0
    result = json.loads(out.read_text())
    short, window, stride, scale, prob, area, refine = TABLES[method]["voc"]
    assert result["protocol"]["name"] == "official"
    assert (result["protocol"]["short_side"], result["protocol"]["window"]) == (short, window)
    assert result["refine"] == refine and result["logit_scale"] == scale
    (model, images, text, win, strd, pad), _ = spy.calls["sliding"][0]
    assert (win, strd, pad) == (window, stride, "centre" if method == "clearclip" else "none")
    assert min(images[0].shape[-2:]) == short  # 30 x 44 -> 336 x 493 (448 x 657)
    names, templates = spy.calls["text"][-1]
    background = ["background"] if method == "clearclip" else list(STUFF_BACKGROUND)
    assert templates == "imagenet" and names[: len(background)] == background
    assert names[len(background) :] == evaluate_module.load_segmentation("voc", root).classes[1:]
    (scores, query_class, num_classes, *rule), _ = spy.calls["labels"][0]
    assert scores.shape == (len(names), 30, 44) and num_classes == 21
    assert query_class.tolist() == [0] * len(background) + list(range(1, 21))
    assert rule == [scale, prob, area]
    assert len(spy.calls["pamr"]) == (refine == "pamr")
    if refine:
        (image, masks), _ = spy.calls["pamr"][0]
        assert image.shape == (1, 3, 30, 44) and masks.shape == (1, len(names), 30, 44)
    predicted = np.asarray(Image.open(saved / "2007_000001.png"))
    assert Image.open(saved / "2007_000001.png").mode == "P" and predicted.shape == (30, 44)
    assert predicted.max() <= 20


def test_overrides_and_saved_ids(tmp_path, monkeypatch):
    """Command-line numbers override the preset (--refine none turns NACLIP's PAMR off);
    ADE's saved PNGs hold ADE's ids (class k as k + 1) and score as the result says."""
    spy = Spy(monkeypatch)
    rng = np.random.default_rng(0)
    labels = {f"ADE_val_{i:08d}": rng.integers(0, 151, (20, 28)).astype(np.uint8) for i in (1, 2)}
    root = write_ade150(tmp_path, labels)
    out, saved = tmp_path / "r.json", tmp_path / "pred"
    args = ["eval", "--dataset", "ade150", "--root", str(root), *MODEL, "--method", "naclip"]
    numbers = ["--short-side", "40", "--window", "32", "--stride", "16", "--logit-scale", "30"]
    extra = ["--refine", "none", "--templates", "single", "--save-predictions", str(saved)]
    assert main([*args, *numbers, *extra, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["preset"]["short_side"] == 40 and result["preset"]["window"] == 32
    assert result["preset"]["logit_scale"] == 30 and result["refine"] is None
    assert spy.calls["pamr"] == [] and spy.calls["text"][-1][1] == "single"
    assert spy.calls["sliding"][0][0][3:] == (32, 16, "none")
    assert spy.calls["labels"][0][0][3:] == (30.0, 0.0, None)
    confusion = np.zeros((150, 150), np.int64)
    for name in labels:
        pred = read_label(saved / f"{name}.png", 150, reduce_zero_label=True)
        truth = read_label(root / "annotations" / "validation" / f"{name}.png", 150, True)
        valid = truth != 255
        np.add.at(confusion, (truth[valid], pred[valid]), 1)
    tp = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - tp
    for k, name in enumerate(result["classes"]):
        want = None if union[k] == 0 else tp[k] / union[k]
        assert result["per_class_iou"][name] == pytest.approx(want)


def test_gem_keeps_the_paper_protocol_and_refines_on_request(tmp_path, monkeypatch):
    spy = Spy(monkeypatch)
    root = write_voc(tmp_path, voc_labels())
    out = tmp_path / "r.json"
    args = ["eval", "--dataset", "voc", "--root", str(root), *MODEL, "--short-side", "24"]
    assert main([*args, "--refine", "pamr", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["protocol"]["name"] == "paper" and result["refine"] == "pamr"
    assert result["background_threshold"] == 0.8 and "preset" not in result
    assert len(spy.calls["pamr"]) == 1 and spy.calls["labels"] == []
    bad = ["--method", "gem", "--protocol", "official"]
    assert main([*args, *bad]) == 2
