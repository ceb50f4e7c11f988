"""Evaluation metrics: confusion-matrix IoU, point IoU (OpenImages V7), and the paper's
section 5 analysis metrics (patch-patch similarity, object-background Michelson contrast,
text-object-background contrast)."""

import math

import torch
import torch.nn.functional as F

from .datasets import IGNORE


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = IGNORE
) -> torch.Tensor:
    """`[C, C]` int64 counts, rows = ground truth, columns = prediction, over the pixels
    whose target is not `ignore_index`."""
    valid = target != ignore_index
    index = target[valid].long() * num_classes + pred[valid].long()
    counts = torch.bincount(index, minlength=num_classes * num_classes)
    return counts.view(num_classes, num_classes).cpu()


def iou_from_confusion(confusion: torch.Tensor) -> list[float]:
    """Per-class IoU = TP / (TP + FP + FN); NaN for a class absent from both ground truth
    and prediction."""
    confusion = confusion.double()
    tp = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - tp
    return [t / u if u > 0 else math.nan for t, u in zip(tp.tolist(), union.tolist(), strict=True)]


def mean_iou(ious: list[float]) -> float:
    """Mean over the classes with a defined IoU (NaN-mean, as mmseg)."""
    values = [v for v in ious if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def point_counts(
    heatmap: torch.Tensor, points: list[tuple[float, float, bool]], threshold: float = 0.5
) -> tuple[int, int, int]:
    """(TP, FP, FN) of one class's min-max normalized heatmap `[H, W]` on its labelled
    points `(x, y, positive)` (x, y in [0, 1]): a point is predicted positive when the map
    is >= `threshold` at its pixel."""
    height, width = heatmap.shape
    tp = fp = fn = 0
    for x, y, positive in points:
        col, row = min(int(x * width), width - 1), min(int(y * height), height - 1)
        predicted = bool(heatmap[row, col] >= threshold)
        tp += predicted and positive
        fp += predicted and not positive
        fn += positive and not predicted
    return tp, fp, fn


def patch_patch_similarity(patches: torch.Tensor) -> float:
    """S_pp: mean cosine similarity over pairs i != j of patch embeddings `[n, E]`."""
    x = F.normalize(patches.double(), dim=-1)
    n = x.shape[0]
    total = (x.sum(0) ** 2).sum() - (x**2).sum()  # sum over i != j of x_i . x_j
    return float(total / (n * (n - 1)))


def _contrast(inside: float, outside: float) -> float | None:
    return (inside - outside) / (inside + outside) if inside + outside > 0 else None


def object_background_contrast(patches: torch.Tensor, mask: torch.Tensor) -> float | None:
    """C^M (paper eq. 7-8): Michelson contrast of the mean positive-part cosine similarity
    inside the mask (pairs i != j) against inside-to-outside. `patches` `[n, E]`, `mask`
    `[n]` bool; None when the mask has fewer than 2 patches or covers everything."""
    m, n = int(mask.sum()), mask.numel()
    if m < 2 or m == n:
        return None
    x = F.normalize(patches.double(), dim=-1)
    sim = (x[mask] @ x.T).clamp(min=0)
    in_in = (sim[:, mask].sum() - sim[:, mask].diagonal().sum()) / (m * (m - 1))
    in_out = sim[:, ~mask].sum() / (m * (n - m))
    return _contrast(float(in_in), float(in_out))


def text_object_background_contrast(
    patches: torch.Tensor, mask: torch.Tensor, text: torch.Tensor
) -> float | None:
    """TC^M (paper section 5.2): Michelson contrast of the mean positive-part cosine
    similarity of the class text embedding `[E]` to patches inside the mask against
    outside. None when the mask is empty or covers everything."""
    m, n = int(mask.sum()), mask.numel()
    if m == 0 or m == n:
        return None
    sim = (F.normalize(patches.double(), dim=-1) @ F.normalize(text.double(), dim=0)).clamp(min=0)
    return _contrast(float(sim[mask].mean()), float(sim[~mask].mean()))
