"""gem: training-free open-vocabulary localization (GEM and baselines) on open_clip ViTs.

import gem
model = gem.create_gem_model("ViT-B-16", pretrained="laion2b_s34b_b88k")
text = model.encode_text(["cat", "dog"])
logits = model(images, text)                  # [B, C, h, w]
maps = gem.heatmaps(logits, images.shape[-2:])  # [B, C, H, W] in [0, 1]

Methods (`gem.list_methods()`): gem, the baselines clip, maskclip, clip_surgery, gem_kmeans,
and SCLIP, ClearCLIP, NACLIP (`method="naclip"`); `gem.sliding_logits` runs their windows
batched, `gem.pamr` refines any method's scores.
"""

from .factory import (
    WeightsUnavailableError,
    create_clip,
    create_gem_model,
    describe_weights,
    resolve_weights,
)
from .heatmap import heatmaps, min_max, patch_logits, semantic_segmentation, upsample
from .methods import METHODS, list_methods
from .model import GEM, ImageFeatures
from .pamr import pamr
from .pos_embed import resample_pos_embed
from .sliding import WINDOWS, Windows, sliding_logits, window_boxes
from .text import IMAGENET_TEMPLATES, SINGLE_TEMPLATE, TEMPLATES, encode_class_names, get_templates
from .transforms import gem_transform, normalize_uint8, resize_rgb, resize_uint8

__all__ = [
    "GEM",
    "IMAGENET_TEMPLATES",
    "METHODS",
    "SINGLE_TEMPLATE",
    "TEMPLATES",
    "WINDOWS",
    "ImageFeatures",
    "WeightsUnavailableError",
    "Windows",
    "create_clip",
    "create_gem_model",
    "describe_weights",
    "encode_class_names",
    "gem_transform",
    "get_templates",
    "heatmaps",
    "list_methods",
    "min_max",
    "normalize_uint8",
    "pamr",
    "patch_logits",
    "resample_pos_embed",
    "resize_rgb",
    "resize_uint8",
    "resolve_weights",
    "semantic_segmentation",
    "sliding_logits",
    "upsample",
    "window_boxes",
]
