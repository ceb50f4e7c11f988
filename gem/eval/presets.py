"""The authors' evaluation settings of SCLIP, ClearCLIP and NACLIP per dataset
(docs/ovss.md section 6, from their `configs/` and segmentors), and their way from
dense scores to labels.

All three: OpenAI ViT-B/16, the 80 ImageNet templates, mmseg's keep-ratio resize to the
short side, the sliding windows of `gem.sliding` (`window` None: the whole image at once).
VOC's background class is queried with words: SCLIP and NACLIP use 26 stuff words,
ClearCLIP the word "background". ClearCLIP's presets are for the paper's method; its
shipped configs run `model_type='vanilla'` (see `gem.methods`).
"""

from dataclasses import asdict, dataclass

import torch

STUFF_BACKGROUND = (
    "sky", "wall", "tree", "wood", "grass", "road", "sea", "river", "mountain", "sands",
    "desk", "bed", "building", "cloud", "lamp", "door", "window", "wardrobe", "ceiling",
    "shelf", "curtain", "stair", "floor", "hill", "rail", "fence",
)  # fmt: skip


@dataclass(frozen=True)
class Preset:
    """One method's settings on one dataset. `prob_threshold`: a pixel whose best class
    probability is under it becomes class 0; `area_threshold` (SCLIP on VOC): a class
    predicted on at most this fraction of the non-background pixels is dropped;
    `background`: the queries of class 0 on datasets with a background class; `refine`:
    "pamr" (10 iterations, dilations 8 and 16) or None."""

    short_side: int
    window: int | None
    stride: int | None
    pad: str
    logit_scale: float
    prob_threshold: float = 0.0
    area_threshold: float | None = None
    background: tuple[str, ...] = ()
    refine: str | None = None
    templates: str = "imagenet"

    def as_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _table(base: dict, rows: dict[str, dict]) -> dict[str, Preset]:
    return {dataset: Preset(**{**base, **row}) for dataset, row in rows.items()}


_SCLIP = dict(window=224, stride=112, pad="none", logit_scale=40.0)
_CLEARCLIP = dict(short_side=448, window=448, stride=224, pad="centre", logit_scale=50.0)
_NACLIP = dict(window=224, stride=112, pad="none", logit_scale=40.0, refine="pamr")

PRESETS: dict[str, dict[str, Preset]] = {
    "sclip": _table(
        _SCLIP,
        {
            "voc": dict(
                short_side=336,
                logit_scale=65.0,
                prob_threshold=0.1,
                area_threshold=0.1,
                background=STUFF_BACKGROUND,
            ),
            "context59": dict(short_side=336),
            "ade150": dict(short_side=336),
            "coco-stuff171": dict(short_side=448),
            "cityscapes": dict(short_side=560),
        },
    ),
    "clearclip": _table(
        _CLEARCLIP,
        {
            "voc": dict(prob_threshold=0.5, background=("background",)),
            "context59": {},
            "ade150": {},
            "coco-stuff171": {},
            "cityscapes": dict(window=224),  # stride stays 224: no overlap
        },
    ),
    "naclip": _table(
        _NACLIP,
        {
            "voc": dict(
                short_side=336,
                window=None,
                stride=None,
                prob_threshold=0.1,
                background=STUFF_BACKGROUND,
            ),
            "context59": dict(short_side=336),
            "ade150": dict(short_side=336),
            "coco-stuff171": dict(short_side=336),
            "cityscapes": dict(short_side=560),
        },
    ),
}


def get_preset(method: str, dataset: str) -> Preset:
    """The authors' settings of `method` on `dataset`, or a ValueError."""
    if method not in PRESETS:
        raise ValueError(
            f"method {method!r} has no official presets; they exist for {list(PRESETS)} "
            "(use the paper or sliding protocol)"
        )
    if dataset not in PRESETS[method]:
        raise ValueError(f"{method}'s official presets cover {list(PRESETS[method])}")
    return PRESETS[method][dataset]


def query_labels(
    scores: torch.Tensor,
    query_class: torch.Tensor,
    num_classes: int,
    logit_scale: float,
    prob_threshold: float = 0.0,
    area_threshold: float | None = None,
) -> torch.Tensor:
    """Labels `[H, W]` from cosine scores `[Q, H, W]` of queries, query q naming class
    `query_class[q]`: softmax over queries at `logit_scale`, each class's best query, the
    area rule, argmax, class 0 where the best probability is under `prob_threshold`."""
    probs = (scores * logit_scale).softmax(dim=0)
    classes = torch.stack([probs[query_class == c].amax(dim=0) for c in range(num_classes)])
    if area_threshold is not None:
        area = torch.bincount(classes.argmax(dim=0).flatten(), minlength=num_classes)[1:]
        keep = (area > area_threshold * area.sum()).to(classes.dtype)
        classes[1:] *= keep[:, None, None]
    best, labels = classes.max(dim=0)
    return torch.where(best < prob_threshold, torch.zeros_like(labels), labels)
