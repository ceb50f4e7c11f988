"""Evaluation protocols: how an image is resized, cut and fed to the model, and how the
patch logits come back to full resolution.

Both protocols resize with mmseg's `Resize(scale=(2048, S), keep_ratio=True)` rule: scale
factor `min(2048 / long side, S / short side)`, sizes rounded to nearest (PIL bilinear
here; mmseg uses cv2 bilinear). The normalized image is zero-padded bottom/right to a
multiple of the patch size; the logits are upsampled bilinearly to the padded size, the
padding cropped off, then upsampled bilinearly to the label's (original) size.

- `paper` (GEM, CVPR 2024, section 6.1, following GroupViT): shorter side 448, the whole
  image at once.
- `sliding` (SCLIP, Wang et al. 2023, `configs/cfg_*.py` and `clip_segmentor.py` of
  github.com/wangf3014/SCLIP; NACLIP's configs use the same numbers):
  224 x 224 windows, stride 112, window logits averaged where windows overlap; shorter side
  336 for voc, context59, ade150; 448 for coco-stuff171; 560 for cityscapes. (ClearCLIP
  instead uses shorter side 448 and 448 windows with stride 224 for VOC/Context; pass
  `short_side`, `window`, `stride` to reproduce such variants.)
- `official` (SCLIP, ClearCLIP, NACLIP): the method's authors' settings for the dataset
  (`gem.eval.presets`): short side, windows and how a window is padded, and their
  post-processing (logit scale, probability and area thresholds, background queries,
  PAMR). Windows are not padded to the patch grid there except ClearCLIP's (evenly).

All windows of a batch of images go through the model together (`gem.sliding_logits`).
"""

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from gem.heatmap import patch_logits, upsample
from gem.model import GEM, ImageFeatures
from gem.transforms import normalize_uint8

from .presets import get_preset

PAPER_SHORT_SIDE = 448
SLIDING_SHORT_SIDE = {
    "voc": 336,
    "context59": 336,
    "ade150": 336,
    "coco-stuff171": 448,
    "cityscapes": 560,
}
SLIDING_WINDOW, SLIDING_STRIDE = 224, 112
MAX_LONG_SIDE = 2048
PROTOCOLS = ("paper", "sliding", "official")


@dataclass(frozen=True)
class Protocol:
    name: str
    short_side: int
    window: int | None = None  # None: the whole image at once
    stride: int | None = None
    max_long_side: int = MAX_LONG_SIDE
    pad: str = "end"  # how a window off the patch grid is fed (`gem.sliding`)

    def as_dict(self) -> dict:
        return asdict(self)


def get_protocol(
    name: str,
    dataset: str,
    short_side: int | None = None,
    window: int | None = None,
    stride: int | None = None,
    method: str | None = None,
) -> Protocol:
    """The protocol `name` for `dataset` (for `official`, `method`'s), with optional
    overrides of its numbers."""
    if name == "paper":
        if window or stride:
            raise ValueError("the paper protocol runs on the whole image: no window or stride")
        return Protocol("paper", short_side or PAPER_SHORT_SIDE)
    if name == "sliding":
        if dataset not in SLIDING_SHORT_SIDE:
            raise ValueError(f"the sliding protocol is defined for {list(SLIDING_SHORT_SIDE)}")
        window, stride = window or SLIDING_WINDOW, stride or SLIDING_STRIDE
        if not 0 < stride <= window:
            raise ValueError(f"need 0 < stride <= window, got stride {stride}, window {window}")
        return Protocol("sliding", short_side or SLIDING_SHORT_SIDE[dataset], window, stride)
    if name == "official":
        preset = get_preset(method, dataset)
        window, stride = window or preset.window, stride or preset.stride or window
        if window is not None and not 0 < stride <= window:
            raise ValueError(f"need 0 < stride <= window, got stride {stride}, window {window}")
        short_side = short_side or preset.short_side
        return Protocol("official", short_side, window, stride, pad=preset.pad)
    raise ValueError(f"unknown protocol {name!r}; choose one of {PROTOCOLS}")


def resized_size(height: int, width: int, protocol: Protocol) -> tuple[int, int]:
    """mmseg's keep-ratio rescale: shorter side to `short_side`, longer side at most
    `max_long_side`."""
    scale = min(
        protocol.max_long_side / max(height, width), protocol.short_side / min(height, width)
    )
    return int(height * scale + 0.5), int(width * scale + 0.5)


def prepare(image: Image.Image, protocol: Protocol, model: GEM) -> torch.Tensor:
    """An RGB image resized by the protocol and normalized with the model's mean/std:
    `[3, h, w]` float32."""
    h, w = resized_size(image.height, image.width, protocol)
    pixels = torch.from_numpy(np.asarray(image.resize((w, h), Image.BILINEAR)).copy())
    visual = model.visual
    return normalize_uint8(pixels[None], visual.image_mean, visual.image_std)[0]


def encode(model: GEM, images: torch.Tensor) -> ImageFeatures:
    """Same-size images `[B, 3, h, w]`, zero-padded bottom/right to the patch grid, through
    the model once."""
    ph, pw = model.patch_size
    h, w = images.shape[-2:]
    return model.encode_image(F.pad(images, (0, -w % pw, 0, -h % ph)))


def features_logits(
    model: GEM, features: ImageFeatures, text: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """Logits `[B, C, h, w]` of encoded images of `size` `(h, w)`: patch logits upsampled
    to the padded size, padding cropped off."""
    logits = patch_logits(
        features.patch_embeds,
        text,
        image_embeds=features.image_embeds if model.feature_surgery else None,
    )
    grid = logits.shape[-2:]
    padded = (grid[0] * model.patch_size[0], grid[1] * model.patch_size[1])
    return upsample(logits, padded)[..., : size[0], : size[1]]
