"""gem.eval: the paper's evaluation on standard dataset layouts (no downloads).

from gem.eval import evaluate
result = evaluate(model, "voc", "VOCdevkit/VOC2012", protocol="paper")
result["miou"], result["per_class_iou"]
"""

from .datasets import DATASETS, LAYOUTS, class_names, load_openimages_points, load_segmentation
from .evaluate import evaluate
from .protocols import PROTOCOLS, Protocol, get_protocol

__all__ = [
    "DATASETS",
    "LAYOUTS",
    "PROTOCOLS",
    "Protocol",
    "class_names",
    "evaluate",
    "get_protocol",
    "load_openimages_points",
    "load_segmentation",
]
