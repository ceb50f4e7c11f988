"""Patch logits of the kept classes -> binary masks at the original resolution, as COCO RLE.

The rule, per image, for the k kept classes (in the order given, best score first):
1. Each class's patch logits `[h, w]` are upsampled bilinearly (align_corners=False) to the
   original image size `(height, width)`.
2. Each upsampled map is min-max normalized to [0, 1] on its own; a constant map (no
   contrast) becomes all zeros.
3. mode "threshold": a class's mask is `normalized >= threshold`, each class on its own, so
   masks may overlap. mode "semantic": each pixel goes to the class with the highest
   normalized value (ties: the earlier class), and only if that value is `>= threshold`;
   masks are disjoint.
   mode "background": no normalization and no threshold; each pixel goes to the kept class
   with the highest upsampled logit (cosine similarity), and only if that beats the
   upsampled background map (the patch-wise maximum over background prompts such as "a
   photo of a background."); masks are disjoint.
`threshold` must lie in (0, 1], so a constant map always gives an empty mask (except in
mode "background", which does not use it).
Every kept class gets a mask, possibly empty (area 0). RLE is pycocotools' compressed
format (column-major), `size` [height, width]; bbox is (x, y, w, h) of the mask's pixels.

Classes are processed in chunks so that memory stays near a few full-resolution maps,
whatever k is. The same torch code runs on any device: the write stage encodes masks on
CPU workers (`encode_masks`), or a GPU actor makes them where its logits already are and
hands over only their run lengths (`flat_masks`, `runs_of`, then `masks_from_runs` in the
write stage).
"""

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

import gem

MASK_MODES = ("threshold", "semantic", "background")
_CHUNK_PIXELS = 1 << 24  # floats per upsampled chunk (64 MiB)
_RUNS_PIXELS = 1 << 28  # mask pixels held on the device before their runs are fetched


def encode_masks(
    logits: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray,
    height: int,
    width: int,
    threshold: float,
    mode: str = "threshold",
    background: np.ndarray | None = None,
) -> list[dict]:
    """Masks of the kept classes of one image: logits `[k, h, w]`, labels `[k]`, scores
    `[k]` (and for mode "background" the background map `[h, w]`) -> one dict per class:
    `label_id`, `score`, `mask` ({"size": [h, w], "counts": str}), `bbox` [x, y, w, h] and
    `area`, by the rule in the module docstring."""
    logits = torch.tensor(np.asarray(logits), dtype=torch.float32)  # copy: Ray arrays are read-only
    if background is not None:
        background = torch.tensor(np.asarray(background), dtype=torch.float32)
    if logits.dim() != 3 or logits.shape[0] != len(labels) or len(scores) != len(labels):
        raise ValueError(
            f"logits {tuple(logits.shape)} do not match {len(labels)} labels and "
            f"{len(scores)} scores"
        )
    _check(logits, height, width, threshold, mode, background)
    masks = binary_masks(logits, height, width, threshold, mode, background)
    return [
        _row(mask_utils.encode(np.asfortranarray(mask.numpy().view(np.uint8))), label, score)
        for mask, label, score in zip(masks, labels, scores, strict=True)
    ]


def flat_masks(
    logits: torch.Tensor,
    height: int,
    width: int,
    threshold: float,
    mode: str = "threshold",
    background: torch.Tensor | None = None,
) -> torch.Tensor:
    """The boolean masks of `encode_masks` flattened column-major, `[k, height * width]`, on
    `logits`' device (nothing is copied to the host, so images can be queued; `runs_of`
    then fetches their run lengths)."""
    _check(logits, height, width, threshold, mode, background)
    masks = binary_masks(logits, height, width, threshold, mode, background)
    flat = [mask.t().reshape(-1) for mask in masks]
    if not flat:
        return torch.zeros(0, height * width, dtype=torch.bool, device=logits.device)
    return torch.stack(flat)


def runs_of(
    masks: Iterable[torch.Tensor], budget: int = _RUNS_PIXELS
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per `flat_masks` output, its masks as uncompressed column-major run lengths (COCO's
    order: a run of zeros first): all classes' counts concatenated `[n]` and the number of
    counts per class `[k]`, int32 on the host. Masks are taken from `masks` (a generator
    makes them one at a time) until `budget` pixels are held, then the change positions of
    all those leave the device in one copy: one copy per batch for ordinary images, and
    device memory bounded for huge ones."""
    out, group, held = [], [], 0
    for m in masks:
        group.append(m)
        held += m.numel()
        if held >= budget:
            out += _runs(group)
            group, held = [], 0
    return out + (_runs(group) if group else [])


def _runs(masks: list[torch.Tensor]) -> list[tuple[np.ndarray, np.ndarray]]:
    # each mask preceded by a virtual 0: a mask starting with 1 changes at position 0
    padded = [F.pad(m, (1, 0)) for m in masks]
    changes = torch.cat([(p[:, 1:] != p[:, :-1]).reshape(-1) for p in padded])
    positions = changes.nonzero().flatten().cpu().numpy()
    out, start = [], 0
    for m in masks:
        k, pixels = m.shape
        row_starts = start + pixels * np.arange(k + 1)
        ends = np.searchsorted(positions, row_starts)
        counts = [
            np.diff(np.concatenate([[0], positions[a:b] - first, [pixels]]))
            for a, b, first in zip(ends[:-1], ends[1:], row_starts[:-1], strict=True)
        ]
        start += m.numel()
        out.append(
            (
                np.concatenate(counts).astype(np.int32) if k else np.zeros(0, np.int32),
                np.array([len(c) for c in counts], dtype=np.int32),
            )
        )
    return out


def masks_from_runs(
    counts: np.ndarray,
    lengths: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray,
    height: int,
    width: int,
) -> list[dict]:
    """The dicts of `encode_masks` from one image's `runs_of` output: pycocotools
    compresses the runs and computes bbox and area."""
    if len(lengths) != len(labels) or len(scores) != len(labels):
        raise ValueError(f"{len(lengths)} masks do not match {len(labels)} labels")
    if int(np.sum(lengths)) != len(counts):
        raise ValueError(f"run lengths sum to {int(np.sum(lengths))}, not {len(counts)}")
    pieces = np.split(np.asarray(counts), np.cumsum(lengths)[:-1]) if len(lengths) else []
    rows = []
    for runs, label, score in zip(pieces, labels, scores, strict=True):
        if int(runs.sum()) != height * width:
            raise ValueError(f"runs cover {int(runs.sum())} pixels, not {height}x{width}")
        rle = mask_utils.frPyObjects(
            {"size": [height, width], "counts": runs.tolist()}, height, width
        )
        rows.append(_row(rle, label, score))
    return rows


def binary_masks(
    logits: torch.Tensor,
    height: int,
    width: int,
    threshold: float,
    mode: str,
    background: torch.Tensor | None = None,
):
    """Yield each kept class's boolean `[height, width]` mask in turn, on `logits`' device."""
    if mode == "background":
        return _background_masks(logits, background, height, width)
    if mode == "threshold":
        return (norm >= threshold for norm in _upsampled_maps(logits, height, width))
    return _semantic_masks(logits, height, width, threshold)


def _check(logits, height, width, threshold, mode, background) -> None:
    if logits.dim() != 3:
        raise ValueError(f"logits must be [k, h, w], got {tuple(logits.shape)}")
    if mode not in MASK_MODES:
        raise ValueError(f"unknown mask mode {mode!r} (one of {', '.join(MASK_MODES)})")
    if not 0 < threshold <= 1:
        raise ValueError(f"mask threshold must be in (0, 1], got {threshold}")
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if mode == "background" and (
        background is None or tuple(background.shape) != tuple(logits.shape[1:])
    ):
        raise ValueError(
            f"mask mode background needs a background map of shape {tuple(logits.shape[1:])}"
        )


def _upsampled_maps(logits: torch.Tensor, height: int, width: int, normalize: bool = True):
    """Yield each class's upsampled (and min-max normalized) `[height, width]` map in turn."""
    chunk = max(1, _CHUNK_PIXELS // (height * width))
    for start in range(0, logits.shape[0], chunk):
        maps = gem.upsample(logits[None, start : start + chunk], (height, width))
        yield from (gem.min_max(maps) if normalize else maps)[0]


def _argmax_owner(maps, best: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pixel, the index of the first map above `best` and all earlier maps (-1: none),
    and the winning value."""
    owner = torch.full(best.shape, -1, dtype=torch.int32, device=best.device)
    for c, value in enumerate(maps):
        better = value > best
        best = torch.where(better, value, best)
        owner = torch.where(better, c, owner)  # owner[better] = c was most of the CPU time
    return owner, best


def _semantic_masks(logits: torch.Tensor, height: int, width: int, threshold: float):
    start = torch.zeros(height, width, device=logits.device)
    owner, best = _argmax_owner(_upsampled_maps(logits, height, width), start)
    owner[best < threshold] = -1
    return (owner == c for c in range(logits.shape[0]))


def _background_masks(logits: torch.Tensor, background: torch.Tensor, height: int, width: int):
    floor = gem.upsample(background[None, None].float(), (height, width))[0, 0]
    owner, _ = _argmax_owner(_upsampled_maps(logits, height, width, normalize=False), floor)
    return (owner == c for c in range(logits.shape[0]))


def _row(rle: dict, label_id, score) -> dict:
    return {
        "label_id": int(label_id),
        "score": float(score),
        "mask": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "area": int(mask_utils.area(rle)),
    }
