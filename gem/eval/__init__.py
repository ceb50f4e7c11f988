"""gem.eval: the paper's evaluation on standard dataset layouts (no downloads).

from gem.eval import evaluate
result = evaluate(model, "voc", "VOCdevkit/VOC2012", protocol="paper")
result["miou"], result["per_class_iou"]

SCLIP, ClearCLIP and NACLIP under their authors' settings: a model built with
`method="naclip"` (say) and `protocol="official"` (`gem.eval.presets`).
"""

from .datasets import DATASETS, LAYOUTS, class_names, load_openimages_points, load_segmentation
from .evaluate import evaluate
from .presets import PRESETS, Preset, get_preset
from .protocols import PROTOCOLS, Protocol, get_protocol

__all__ = [
    "DATASETS",
    "LAYOUTS",
    "PRESETS",
    "PROTOCOLS",
    "Preset",
    "Protocol",
    "class_names",
    "evaluate",
    "get_preset",
    "get_protocol",
    "load_openimages_points",
    "load_segmentation",
]
