"""gem.eval.metrics and scoring: confusion-matrix mIoU, the VOC background rule, point IoU,
and the paper's section 5 analysis metrics against their formulas."""

import itertools
import math

import numpy as np
import pytest
import torch
from PIL import Image

import gem
from gem.eval import get_protocol, load_segmentation, metrics
from gem.eval.evaluate import score_segmentation, segmentation_predictor
from tests.eval_data import write_context59, write_voc

I = 255  # noqa: E741  (ignore)


def test_confusion_and_iou_by_hand():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, I, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
    confusion = metrics.confusion_matrix(pred, target, num_classes=4)
    expected = torch.tensor([[1, 1, 0, 0], [1, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    assert torch.equal(confusion, expected)  # the ignored pixel (predicted 2) is not counted
    iou = metrics.iou_from_confusion(confusion)
    assert iou[:3] == pytest.approx([1 / 4, 2 / 4, 1 / 2]) and math.isnan(iou[3])
    assert metrics.mean_iou(iou) == pytest.approx((1 / 4 + 2 / 4 + 1 / 2) / 3)


def test_score_segmentation_known_predictor_on_disk(tmp_path):
    """Two context59 images (stored 0 = ignore, k = class k-1) and a predictor with fixed
    output: per-class IoU from the hand-computed confusion matrix over both images."""
    stored = {
        "a": np.array([[1, 1, 2], [0, 2, 2]], np.uint8),
        "b": np.array([[3, 3], [1, 0]], np.uint8),
    }
    preds = {
        "a": torch.tensor([[0, 1, 1], [2, 1, 1]]),
        "b": torch.tensor([[2, 0], [0, 0]]),
    }
    data = load_segmentation("context59", write_context59(tmp_path, stored))
    order = iter([preds["a"], preds["b"]])

    def predict(images):
        return [next(order) for _ in images]

    result = score_segmentation(data, predict, batch_size=1)
    # class 0: gt a(0,0),a(0,1),b(1,0) -> pred 0,1,0 ; class 1: gt a(0,2),a(1,1),a(1,2) -> 1,1,1
    # class 2: gt b(0,0),b(0,1) -> 2,0 ; ignored: a(1,0) (pred 2), b(1,1) (pred 0)
    # class 0: TP 2, FN 1 (->1), FP 1 (b(0,1)) -> 2/4; class 1: TP 3, FP 1 -> 3/4;
    # class 2: TP 1, FN 1 -> 1/2
    assert result["iou"][:3] == pytest.approx([2 / 4, 3 / 4, 1 / 2])
    assert all(math.isnan(v) for v in result["iou"][3:])
    assert result["counts"]["images"] == 2 and result["counts"]["pixels"] == 8
    assert result["counts"]["pixels_per_class"]["aeroplane"] == 3
    limited = score_segmentation(data, lambda images: [preds["a"]], limit=1)
    assert limited["counts"]["images"] == 1 and limited["counts"]["pixels"] == 5


def test_background_rule_constructed_logits():
    """Softmax at the logit scale; background where the top probability is under 0.8."""
    scale = 100.0
    # pixel 0: class 1 leads by ln(9)/scale -> p = 0.9 (kept, label 2);
    # pixel 1: leads by ln(3)/scale -> p = 0.75 (background, label 0)
    margins = torch.tensor([math.log(9), math.log(3)]) / scale
    logits = torch.zeros(1, 2, 1, 2)
    logits[0, 1, 0] = margins
    labels = gem.semantic_segmentation(logits, (1, 2), scale, background_threshold=0.8)
    assert labels.tolist() == [[[2, 0]]]
    assert gem.semantic_segmentation(logits, (1, 2), scale, 0.7).tolist() == [[[2, 2]]]


@pytest.fixture(scope="module")
def tiny_gem():
    return gem.create_gem_model("gemlabel-tiny")


def test_voc_predictor_applies_background_rule(tmp_path, tiny_gem):
    """The VOC predictor prompts the 20 foreground classes only and shifts them to 1..20;
    threshold 0 keeps every pixel foreground, a threshold above 1 makes all background."""
    label = np.zeros((24, 40), np.uint8)
    data = load_segmentation("voc", write_voc(tmp_path, {"x": label}))
    protocol = get_protocol("paper", "voc", short_side=24)
    with Image.open(data.samples[0].image) as image:
        images = [image.convert("RGB")]
    never = segmentation_predictor(tiny_gem, data, protocol, background_threshold=0.0)(images)[0]
    always = segmentation_predictor(tiny_gem, data, protocol, background_threshold=1.01)(images)[0]
    assert never.shape == (24, 40) and always.shape == (24, 40)
    assert never.min() >= 1 and never.max() <= 20
    assert (always == 0).all()


def test_point_counts():
    heatmap = torch.tensor([[0.0, 0.2, 0.9, 1.0], [0.4, 0.5, 0.6, 0.1]])  # [H=2, W=4]
    points = [
        (0.6, 0.1, True),  # pixel (0, 2) = 0.9 -> TP
        (0.99, 0.2, True),  # pixel (0, 3) = 1.0 -> TP
        (0.3, 0.6, True),  # pixel (1, 1) = 0.5 -> TP (>= threshold)
        (0.0, 0.0, True),  # pixel (0, 0) = 0.0 -> FN
        (1.0, 1.0, False),  # clamped to pixel (1, 3) = 0.1 -> TN
        (0.5, 0.7, False),  # pixel (1, 2) = 0.6 -> FP
    ]
    assert metrics.point_counts(heatmap, points, 0.5) == (3, 1, 1)


def brute_force(x: torch.Tensor, mask: torch.Tensor, t: torch.Tensor):
    """The paper's formulas as literal loops."""
    x = x.double()
    cos = torch.nn.functional.cosine_similarity
    n = len(x)
    pairs = [(i, j) for i, j in itertools.product(range(n), repeat=2) if i != j]
    s_pp = sum(float(x[i] @ x[j] / x[i].norm() / x[j].norm()) for i, j in pairs) / len(pairs)
    inside = [i for i in range(n) if mask[i]]
    outside = [i for i in range(n) if not mask[i]]
    m = len(inside)

    def pos(a, b):
        return max(float(cos(a, b, dim=0)), 0.0)

    s_in = sum(pos(x[i], x[j]) for i in inside for j in inside if i != j) / (m * (m - 1))
    s_out = sum(pos(x[i], x[k]) for i in inside for k in outside) / (m * (n - m))
    t_in = sum(pos(t.double(), x[i]) for i in inside) / m
    t_out = sum(pos(t.double(), x[k]) for k in outside) / (n - m)
    return s_pp, (s_in - s_out) / (s_in + s_out), (t_in - t_out) / (t_in + t_out)


def test_analysis_metrics_match_formulas():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(9, 5, generator=gen) + 0.5
    mask = torch.tensor([1, 1, 0, 1, 0, 0, 1, 0, 0], dtype=torch.bool)
    t = torch.randn(5, generator=gen)
    s_pp, contrast, text_contrast = brute_force(x, mask, t)
    assert metrics.patch_patch_similarity(x) == pytest.approx(s_pp, abs=1e-12)
    assert metrics.object_background_contrast(x, mask) == pytest.approx(contrast, abs=1e-12)
    assert metrics.text_object_background_contrast(x, mask, t) == pytest.approx(
        text_contrast, abs=1e-12
    )


def test_analysis_metrics_constructed_case():
    """Object patches along e1, background along e2 (orthogonal): contrast 1; text along e1:
    text contrast 1; text along -e1: positive parts all zero inside -> -1."""
    e1, e2 = torch.eye(2)
    x = torch.stack([e1, 2 * e1, e1, e2, e2])
    mask = torch.tensor([True, True, True, False, False])
    assert metrics.object_background_contrast(x, mask) == pytest.approx(1.0)
    assert metrics.text_object_background_contrast(x, mask, e1) == pytest.approx(1.0)
    assert metrics.text_object_background_contrast(x, mask, -e1 + e2) == pytest.approx(-1.0)
    # pairs i != j: 3*2 + 2*1 similar (cos 1), 12 orthogonal -> 8 / 20
    assert metrics.patch_patch_similarity(x) == pytest.approx(8 / 20)
    assert metrics.object_background_contrast(x, torch.tensor([1, 0, 0, 0, 0]).bool()) is None
