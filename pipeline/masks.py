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
whatever k is.
"""

import numpy as np
import torch
from pycocotools import mask as mask_utils

import gem

MASK_MODES = ("threshold", "semantic", "background")
_CHUNK_PIXELS = 1 << 24  # floats per upsampled chunk (64 MiB)


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
    k = len(labels)
    if logits.dim() != 3 or logits.shape[0] != k or len(scores) != k:
        raise ValueError(
            f"logits {tuple(logits.shape)} do not match {k} labels and {len(scores)} scores"
        )
    if mode not in MASK_MODES:
        raise ValueError(f"unknown mask mode {mode!r} (one of {', '.join(MASK_MODES)})")
    if not 0 < threshold <= 1:
        raise ValueError(f"mask threshold must be in (0, 1], got {threshold}")
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if mode == "background":
        if background is None or np.shape(background) != tuple(logits.shape[1:]):
            raise ValueError(
                f"mask mode background needs a background map of shape {tuple(logits.shape[1:])}"
            )
        masks = _background_masks(logits, torch.tensor(np.asarray(background)), height, width)
    elif mode == "threshold":
        masks = (norm >= threshold for norm in _upsampled_maps(logits, height, width))
    else:
        masks = _semantic_masks(logits, height, width, threshold)
    return [
        _encode(mask.numpy(), int(label), float(score))
        for mask, label, score in zip(masks, labels, scores, strict=True)
    ]


def _upsampled_maps(logits: torch.Tensor, height: int, width: int, normalize: bool = True):
    """Yield each class's upsampled (and min-max normalized) `[height, width]` map in turn."""
    chunk = max(1, _CHUNK_PIXELS // (height * width))
    for start in range(0, logits.shape[0], chunk):
        maps = gem.upsample(logits[None, start : start + chunk], (height, width))
        yield from (gem.min_max(maps) if normalize else maps)[0]


def _argmax_owner(maps, best: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pixel, the index of the first map above `best` and all earlier maps (-1: none),
    and the winning value."""
    owner = torch.full(best.shape, -1, dtype=torch.int32)
    for c, value in enumerate(maps):
        better = value > best
        best = torch.where(better, value, best)
        owner[better] = c
    return owner, best


def _semantic_masks(logits: torch.Tensor, height: int, width: int, threshold: float):
    owner, best = _argmax_owner(_upsampled_maps(logits, height, width), torch.zeros(height, width))
    owner[best < threshold] = -1
    return (owner == c for c in range(logits.shape[0]))


def _background_masks(logits: torch.Tensor, background: torch.Tensor, height: int, width: int):
    floor = gem.upsample(background[None, None].float(), (height, width))[0, 0]
    owner, _ = _argmax_owner(_upsampled_maps(logits, height, width, normalize=False), floor)
    return (owner == c for c in range(logits.shape[0]))


def _encode(mask: np.ndarray, label_id: int, score: float) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.view(np.uint8)))  # bool -> 0/1 bytes
    return {
        "label_id": label_id,
        "score": score,
        "mask": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "area": int(mask_utils.area(rle)),
    }
