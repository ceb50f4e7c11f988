"""Patch logits of the kept classes -> binary masks at the original resolution, as COCO RLE.

The rule, per image, for the k kept classes (in the order given, best score first):
1. Each class's patch logits `[h, w]` are upsampled bilinearly (align_corners=False) to the
   original image size `(height, width)`.
2. Each upsampled map is min-max normalized to [0, 1] on its own; a constant map (no
   contrast) becomes all zeros. (Mode "threshold" compares the raw map with
   `lo + threshold * (hi - lo)` instead: the same rule without a division per pixel.)
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
A kept class whose mask covers no pixel gets no mask: an empty mask is not a label (the
write stage counts it as dropped, `dropped_empty`; the image's `labels` keep it, being the
image-level top-k). RLE is pycocotools' compressed format (column-major), `size`
[height, width]; bbox is (x, y, w, h) of the mask's pixels.

Classes are processed in chunks so that memory stays near a few full-resolution maps,
whatever k is. Maps are upsampled transposed, `[width, height]`, so that each mask is
already in COCO's column-major order: pycocotools encodes a chunk of masks in one call,
without a copy. The same torch code runs on any device: the write stage encodes masks on
CPU workers (`encode_masks`), or a GPU actor makes them where its logits already are
(`flat_masks_of`: same-size images together) and hands over only their run lengths
(`runs_of`, then `masks_from_runs` in the write stage).
"""

from collections.abc import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from pipeline.stages.options import MASK_MODES

_CHUNK_PIXELS = 1 << 24  # floats per upsampled chunk (64 MiB)
_RUNS_PIXELS = 1 << 28  # mask pixels held on the device before their runs are fetched
_GROUP_PIXELS = 1 << 24  # mask pixels of same-size images made at once on a GPU


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
    `[k]` (and for mode "background" the background map `[h, w]`) -> one dict per class
    whose mask is not empty, in the order given: `label_id`, `score`, `mask` ({"size":
    [h, w], "counts": str}), `bbox` [x, y, w, h] and `area`, by the rule in the module
    docstring."""
    logits = torch.tensor(np.asarray(logits), dtype=torch.float32)  # copy: Ray arrays are read-only
    if background is not None:
        background = torch.tensor(np.asarray(background), dtype=torch.float32)
    if logits.dim() != 3 or logits.shape[0] != len(labels) or len(scores) != len(labels):
        raise ValueError(
            f"logits {tuple(logits.shape)} do not match {len(labels)} labels and "
            f"{len(scores)} scores"
        )
    _check(logits, height, width, threshold, mode, background)
    rles = []
    for chunk in binary_masks(logits, height, width, threshold, mode, background):
        # [c, width, height] C-contiguous is [height, width, c] column-major: no copy
        rles += mask_utils.encode(chunk.numpy().view(np.uint8).transpose(2, 1, 0))
    return _rows(rles, labels, scores)


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
    chunks = binary_masks(logits, height, width, threshold, mode, background)
    flat = [chunk.reshape(chunk.shape[0], -1) for chunk in chunks]
    if not flat:
        return torch.zeros(0, height * width, dtype=torch.bool, device=logits.device)
    return torch.cat(flat)


def flat_masks_of(
    logits: list[torch.Tensor],
    sizes: list[tuple[int, int]],
    threshold: float,
    mode: str = "threshold",
    background: torch.Tensor | None = None,
    budget: int | None = None,
) -> Iterator[torch.Tensor]:
    """`flat_masks` of several images in order: per image its logits `[k, h, w]`, size
    (height, width) and, for mode "background", `background[i]`. In mode "threshold", where
    a class's mask depends on its own map only, consecutive images of one size are made
    together, up to `budget` mask pixels (0: one image at a time): the same masks from
    fewer, larger kernels, for GPUs, whose per-image kernels are launch-bound (default
    2^24 there; not yet measured). On the CPU that is slower (0.93x at 2^24, one thread,
    640x480: the larger working set), so there the default is 0."""
    if budget is None:
        budget = _GROUP_PIXELS if logits and logits[0].device.type != "cpu" else 0
    if mode != "threshold" or budget == 0:  # one image at a time
        for i, (grid, size) in enumerate(zip(logits, sizes, strict=True)):
            yield flat_masks(
                grid, *size, threshold, mode, None if background is None else background[i]
            )
        return
    start = 0
    while start < len(logits):
        size, end, held = sizes[start], start, 0
        while end < len(logits) and sizes[end] == size:
            pixels = logits[end].shape[0] * size[0] * size[1]
            if end > start and held + pixels > budget:
                break
            held, end = held + pixels, end + 1
        group = logits[start:end]
        yield from flat_masks(torch.cat(group), *size, threshold).split([len(g) for g in group])
        start = end


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
    """The dicts of `encode_masks` from one image's `runs_of` output (empty masks left out):
    pycocotools compresses the runs and computes bbox and area."""
    if len(lengths) != len(labels) or len(scores) != len(labels):
        raise ValueError(f"{len(lengths)} masks do not match {len(labels)} labels")
    if int(np.sum(lengths)) != len(counts):
        raise ValueError(f"run lengths sum to {int(np.sum(lengths))}, not {len(counts)}")
    pieces = np.split(np.asarray(counts), np.cumsum(lengths)[:-1]) if len(lengths) else []
    for runs in pieces:
        if int(runs.sum()) != height * width:
            raise ValueError(f"runs cover {int(runs.sum())} pixels, not {height}x{width}")
    if not pieces:  # pycocotools refuses an empty list
        return []
    uncompressed = [{"size": [height, width], "counts": runs.tolist()} for runs in pieces]
    return _rows(mask_utils.frPyObjects(uncompressed, height, width), labels, scores)


def binary_masks(
    logits: torch.Tensor,
    height: int,
    width: int,
    threshold: float,
    mode: str,
    background: torch.Tensor | None = None,
):
    """Yield the kept classes' boolean masks in chunks of classes, each `[c, width, height]`:
    transposed, so that each image column is contiguous (COCO's column-major order), on
    `logits`' device."""
    if mode == "background":
        return _background_masks(logits, background, height, width)
    if mode == "threshold":
        return _threshold_masks(logits, height, width, threshold)
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


def _classes_per_chunk(height: int, width: int) -> int:
    return max(1, _CHUNK_PIXELS // (height * width))


def _column_maps(logits: torch.Tensor, height: int, width: int):
    """Yield the classes' patch logits and upsampled maps in chunks of classes: `[c, h, w]`
    and `[c, width, height]` (transposed)."""
    chunk = _classes_per_chunk(height, width)
    for start in range(0, logits.shape[0], chunk):
        grid = logits[start : start + chunk]
        yield grid, _upsampled_columns(grid, height, width)


def _upsampled_columns(grid: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear upsampling (align_corners=False) of `[..., h, w]` maps, transposed:
    `[..., width, height]`. Bilinear is separable: two products with the interpolation
    matrices (F.interpolate's weights), 1.5x faster than F.interpolate on CPU and equal to
    it up to float rounding."""
    rows = _interpolation(grid.shape[-2], height, grid)  # [height, h]
    columns = _interpolation(grid.shape[-1], width, grid)  # [width, w]
    return columns @ (grid.transpose(-1, -2) @ rows.T)


def _interpolation(size: int, out: int, like: torch.Tensor) -> torch.Tensor:
    """`[out, size]`: row i holds the weights of F.interpolate's linear output i."""
    eye = torch.eye(size, dtype=like.dtype, device=like.device)[None]
    return F.interpolate(eye, size=out, mode="linear", align_corners=False)[0].T


def _min_and_range(grid: torch.Tensor, maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each map's minimum and range `[c]`. The range is 0 for a constant patch grid: the
    rounding of its upsampling is not contrast."""
    flat = maps.flatten(1)  # amin + amax: 12x faster than aminmax on CPU (torch 2.14)
    lo, hi = flat.amin(1), flat.amax(1)
    constant = grid.flatten(1).amax(1) == grid.flatten(1).amin(1)
    return lo, torch.where(constant, 0.0, hi - lo)


def _threshold_masks(logits: torch.Tensor, height: int, width: int, threshold: float):
    # min-max normalized >= threshold, as raw map >= lo + threshold * range: no division
    for grid, maps in _column_maps(logits, height, width):
        lo, span = _min_and_range(grid, maps)
        cut = torch.where(span > 0, lo + threshold * span, torch.inf)  # constant: empty
        yield maps >= cut[:, None, None]


def _normalized(grid: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    lo, span = _min_and_range(grid, maps)
    scale = torch.where(span > 0, 1 / span, 0.0)  # a constant map: all zeros
    return (maps - lo[:, None, None]).mul_(scale[:, None, None])


def _semantic_masks(logits: torch.Tensor, height: int, width: int, threshold: float):
    def chunks():
        return (_normalized(grid, maps) for grid, maps in _column_maps(logits, height, width))

    start = torch.zeros(width, height, device=logits.device)
    return _argmax_masks(chunks, logits.shape[0], start, threshold)


def _background_masks(logits: torch.Tensor, background: torch.Tensor, height: int, width: int):
    def chunks():
        return (maps for _, maps in _column_maps(logits, height, width))

    floor = _upsampled_columns(background.float(), height, width)
    return _argmax_masks(chunks, logits.shape[0], floor)


def _argmax_masks(chunks, classes: int, floor: torch.Tensor, threshold: float | None = None):
    """Yield, per chunk of `chunks()` (maps `[c, width, height]`), each class's mask: the
    pixels where its map is the highest of all classes, above `floor` (which wins ties) and
    at least `threshold`; a tie between classes goes to the earlier one. The maps are made
    twice, unless they fit in one chunk."""
    if classes <= _classes_per_chunk(*reversed(floor.shape)):
        held = list(chunks())
        chunks = lambda: held  # noqa: E731
    best = floor
    for maps in chunks():
        best = torch.maximum(best, maps.amax(0))  # amax + equality: 3x faster than max + where
    free = best > floor
    if threshold is not None:
        free &= best >= threshold
    for maps in chunks():
        masks = maps == best
        for mask in masks:  # the first class at the maximum takes the pixel
            mask &= free
            free ^= mask
        yield masks


def _rows(rles: list[dict], labels, scores) -> list[dict]:
    """The rows of the non-empty masks among `rles` (an empty mask is not a label)."""
    if not rles:  # pycocotools refuses an empty list
        return []
    boxes, areas = mask_utils.toBbox(rles), mask_utils.area(rles)
    return [
        {
            "label_id": int(label_id),
            "score": float(score),
            "mask": {
                "size": [int(s) for s in rle["size"]],
                "counts": rle["counts"].decode("ascii"),
            },
            "bbox": [float(v) for v in box],
            "area": int(area),
        }
        for rle, label_id, score, box, area in zip(rles, labels, scores, boxes, areas, strict=True)
        if area > 0
    ]
