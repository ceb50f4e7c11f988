"""Sliding-window inference, batched: every window of every image through the model in one
forward per window shape (the authors run them one at a time, batch 1).

Windows are laid as mmseg's slide inference (docs/ovss.md section 1): `window` squares
every `stride` pixels, the last row/column moved back inside the image, windows clipped to
an image smaller than them. Each window's patch logits are upsampled bilinearly to its
pixel size; overlapping windows are averaged. A window whose side is not a multiple of the
patch is fed by `pad`:

- `none` (SCLIP, NACLIP): as is; the convolution drops the last pixels and upsampling
  stretches the grid over the whole window;
- `centre` (ClearCLIP): zero-padded evenly (an odd extra pixel right/bottom), logits
  upsampled to the padded size and cut back;
- `end` (gemlabel's GEM evaluation): zero-padded right/bottom, likewise cut back.
"""

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .heatmap import patch_logits, upsample
from .model import GEM

PADS = ("none", "centre", "end")


@dataclass(frozen=True)
class Windows:
    """A sliding-window setting: `size` x `size` windows every `stride` pixels (size None:
    the whole image in one window), fed with `pad`."""

    size: int | None
    stride: int | None
    pad: str = "none"


# The authors' defaults (their segmentors' `slide_crop`, `slide_stride`).
WINDOWS: dict[str, Windows] = {
    "sclip": Windows(224, 112, "none"),
    "clearclip": Windows(448, 224, "centre"),
    "naclip": Windows(224, 112, "none"),
}


def window_boxes(height: int, width: int, window: int, stride: int) -> list[tuple[int, ...]]:
    """Sliding windows `(y1, y2, x1, x2)` covering `height x width`: starts every `stride`,
    the last window moved back inside the image; windows are `min(window, side)` long."""
    if not 0 < stride <= window:
        raise ValueError(f"need 0 < stride <= window, got stride {stride}, window {window}")
    rows = max(height - window + stride - 1, 0) // stride + 1
    cols = max(width - window + stride - 1, 0) // stride + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + window, height), min(c * stride + window, width)
            boxes.append((max(y2 - window, 0), y2, max(x2 - window, 0), x2))
    return boxes


def _padding(size: int, patch: int, pad: str) -> tuple[int, int]:
    extra = -size % patch if pad != "none" else 0
    before = extra // 2 if pad == "centre" else 0
    return before, extra - before


def window_logits(
    model: GEM, crops: torch.Tensor, text: torch.Tensor, pad: str = "none"
) -> torch.Tensor:
    """Same-size crops `[K, 3, h, w]` through the model at once: logits `[K, C, h, w]`."""
    if pad not in PADS:
        raise ValueError(f"unknown pad {pad!r}; choose one of {PADS}")
    (h, w), (ph, pw) = crops.shape[-2:], model.patch_size
    top, bottom = _padding(h, ph, pad)
    left, right = _padding(w, pw, pad)
    padded = F.pad(crops, (left, right, top, bottom))
    features = model.encode_image(padded)
    logits = patch_logits(
        features.patch_embeds,
        text,
        image_embeds=features.image_embeds if model.feature_surgery else None,
    )
    logits = upsample(logits, padded.shape[-2:])
    return logits[..., top : top + h, left : left + w]


def sliding_logits(
    model: GEM,
    images: Sequence[torch.Tensor],
    text: torch.Tensor,
    window: int | None,
    stride: int | None = None,
    pad: str = "none",
    max_windows: int | None = None,
) -> list[torch.Tensor]:
    """Logits `[C, H_i, W_i]` of each image `[3, H_i, W_i]` (a list, or a `[B, 3, H, W]`
    tensor): all windows of all images go through the model together, one forward per
    window shape (at most `max_windows` windows per forward when given); `window` None is
    the whole image in one window. Equal to running the windows one at a time (the model is
    batch-invariant).

    Memory: the windows' upsampled logits, `windows x C x window^2` floats, plus one
    `C x H x W` canvas per image: meant for evaluation-size class lists.
    """
    boxes = [
        [(0, im.shape[-2], 0, im.shape[-1])]
        if window is None
        else window_boxes(im.shape[-2], im.shape[-1], window, stride or window)
        for im in images
    ]
    groups: dict[tuple[int, int], list[tuple[int, tuple[int, ...]]]] = defaultdict(list)
    for i, image_boxes in enumerate(boxes):
        for box in image_boxes:
            groups[(box[1] - box[0], box[3] - box[2])].append((i, box))
    canvases = [im.new_zeros((text.shape[-2], *im.shape[-2:])) for im in images]
    counts = [im.new_zeros((1, *im.shape[-2:])) for im in images]
    for members in groups.values():
        step = max_windows or len(members)
        for start in range(0, len(members), step):
            chunk = members[start : start + step]
            crops = torch.stack([images[i][:, y1:y2, x1:x2] for i, (y1, y2, x1, x2) in chunk])
            chunk_text = text if text.dim() == 2 else text[[i for i, _ in chunk]]
            for (i, (y1, y2, x1, x2)), logits in zip(
                chunk, window_logits(model, crops, chunk_text, pad), strict=True
            ):
                canvases[i][:, y1:y2, x1:x2] += logits
                counts[i][:, y1:y2, x1:x2] += 1
    return [canvas / count for canvas, count in zip(canvases, counts, strict=True)]
