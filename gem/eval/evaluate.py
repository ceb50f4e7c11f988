"""The evaluation loop: a GEM model on a dataset under a protocol -> per-class IoU, mIoU,
configuration and counts (and, optionally, the paper's section 5 analysis metrics)."""

import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from gem.heatmap import min_max, semantic_segmentation, upsample
from gem.model import GEM, ImageFeatures
from gem.pamr import pamr
from gem.sliding import sliding_logits

from . import metrics
from .datasets import (
    IGNORE,
    OPENIMAGES,
    SegmentationDataset,
    SegmentationSample,
    load_openimages_points,
    load_segmentation,
)
from .presets import Preset, get_preset, query_labels
from .protocols import Protocol, encode, features_logits, get_protocol, prepare

DEFAULT_BACKGROUND_THRESHOLD = 0.8
POINT_THRESHOLD = 0.5
REFINEMENTS = ("none", "pamr")


def evaluate(
    model: GEM,
    dataset: str,
    root: str,
    protocol: str = "paper",
    *,
    limit: int | None = None,
    batch_size: int = 8,
    templates: str | None = None,
    background_threshold: float | None = None,
    analysis: bool = False,
    short_side: int | None = None,
    window: int | None = None,
    stride: int | None = None,
    logit_scale: float | None = None,
    refine: str | None = None,
    save_predictions: str | Path | None = None,
) -> dict:
    """Evaluate `model` on `dataset` read from `root` (see `gem.eval.datasets`).

    Under the `official` protocol the method's authors' preset for the dataset
    (`gem.eval.presets`) sets the numbers; the arguments given override it
    (`background_threshold` is its probability threshold). `refine`: "pamr" or "none"
    (default: the preset's, else none). `save_predictions`: a directory receiving one
    label PNG per image (`<id>.png`, palette, the dataset's own label ids).

    Returns a JSON-ready dict: `dataset`, `protocol` (its numbers), `method` (the model's
    resolved options), `classes`, `per_class_iou` (None where undefined), `miou`,
    `counts`, `seconds`, `refine`, `logit_scale`, the preset when official, and `analysis`
    when asked (segmentation datasets only).
    """
    start = time.perf_counter()
    model.eval()
    if refine not in (None, *REFINEMENTS):
        raise ValueError(f"unknown refinement {refine!r}; choose one of {REFINEMENTS}")
    if dataset == OPENIMAGES:
        if protocol != "paper":
            raise ValueError(f"{OPENIMAGES} is evaluated with the paper protocol only")
        if analysis or save_predictions or refine == "pamr":
            raise ValueError(
                "--analysis, --save-predictions and --refine need segmentation masks; "
                "not for point labels"
            )
        proto = get_protocol("paper", dataset, short_side)
        templates = templates or "single"
        result = _evaluate_points(model, root, proto, limit, batch_size, templates)
    else:
        proto = get_protocol(protocol, dataset, short_side, window, stride, model.method.name)
        data = load_segmentation(dataset, root)
        preset = None
        if proto.name == "official":
            preset = get_preset(model.method.name, dataset)
            preset = replace(
                preset,
                short_side=proto.short_side,
                window=proto.window,
                stride=proto.stride,
                logit_scale=logit_scale or preset.logit_scale,
                prob_threshold=(
                    preset.prob_threshold if background_threshold is None else background_threshold
                ),
                refine=None if refine == "none" else (refine or preset.refine),
                templates=templates or preset.templates,
            )
            templates, refine = preset.templates, preset.refine
            logit_scale = preset.logit_scale
        else:
            templates = templates or "single"
            refine = None if refine == "none" else refine
            logit_scale = logit_scale or float(model.model.logit_scale.detach().exp())
            if background_threshold is None:
                background_threshold = DEFAULT_BACKGROUND_THRESHOLD
        predict = segmentation_predictor(
            model,
            data,
            proto,
            batch_size,
            templates,
            background_threshold,
            logit_scale=logit_scale,
            refine=refine,
            preset=preset,
        )
        result = score_segmentation(data, predict, limit, batch_size, save_predictions)
        result["logit_scale"] = logit_scale
        result["refine"] = refine
        if preset is not None:
            result["preset"] = preset.as_dict()
        elif data.layout.background:
            result["background_threshold"] = background_threshold
        if analysis:
            result["analysis"] = analyze(model, data, proto, limit, batch_size, templates)
    iou = result.pop("iou")
    return {
        "dataset": dataset,
        "root": str(root),
        "protocol": proto.as_dict(),
        "method": model.config,
        "templates": templates,
        **result,
        "per_class_iou": {
            c: None if math.isnan(v) else v for c, v in zip(result["classes"], iou, strict=True)
        },
        "miou": None if math.isnan(miou := metrics.mean_iou(iou)) else miou,
        "seconds": round(time.perf_counter() - start, 3),
    }


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _read_rgb(path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def _device(model: GEM) -> torch.device:
    return next(model.parameters()).device


def _whole_images(
    model: GEM, text: torch.Tensor, images: list[torch.Tensor]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(patch embeddings `[gh, gw, E]`, logits `[C, h, w]`) per image, one model call per
    group of same-size images."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, image in enumerate(images):
        groups[tuple(image.shape)].append(i)
    out: list = [None] * len(images)
    for indices in groups.values():
        batch = torch.stack([images[i] for i in indices])
        features = encode(model, batch)
        logits = features_logits(model, features, text, batch.shape[-2:])
        for j, i in enumerate(indices):
            out[i] = (features.patch_embeds[j], logits[j])
    return out


Predictor = Callable[[list[Image.Image]], list[torch.Tensor]]


def segmentation_predictor(
    model: GEM,
    data: SegmentationDataset,
    protocol: Protocol,
    batch_size: int = 8,
    templates: str = "single",
    background_threshold: float | None = DEFAULT_BACKGROUND_THRESHOLD,
    *,
    logit_scale: float | None = None,
    refine: str | None = None,
    preset: Preset | None = None,
) -> Predictor:
    """RGB images -> label maps `[H, W]` at their own size.

    The windows of all images of a call go through the model together; their logits are
    upsampled to the original size and, with `refine="pamr"`, refined by PAMR against the
    network input upsampled likewise (docs/ovss.md section 5). Labels: with a `preset`,
    its authors' rule (`query_labels`: background queries, probability and area
    thresholds, at its logit scale); else argmax over the dataset's classes, or for a
    dataset with a background class (VOC) the threshold rule (`gem.semantic_segmentation`:
    softmax at `logit_scale`, default the model's, background where the top probability is
    under `background_threshold`)."""
    device = _device(model)
    background = data.layout.background
    classes = data.classes[1:] if background else data.classes
    query_class = None
    if preset is not None:
        queries = preset.background if background else ()
        if background and not queries:
            raise ValueError(f"the preset for {data.name} names no background queries")
        first = 1 if background else 0
        query_class = torch.tensor(
            [0] * len(queries) + list(range(first, len(data.classes))), device=device
        )
        classes = [*queries, *classes]
        background_threshold = preset.prob_threshold
    text = model.encode_text(classes, templates).to(device)
    logit_scale = logit_scale or float(model.model.logit_scale.detach().exp())

    @torch.no_grad()
    def predict(originals: list[Image.Image]) -> list[torch.Tensor]:
        images = [prepare(o, protocol, model).to(device) for o in originals]
        logits = sliding_logits(model, images, text, protocol.window, protocol.stride, protocol.pad)
        preds = []
        for original, image, lg in zip(originals, images, logits, strict=True):
            size = (original.height, original.width)
            scores = upsample(lg[None], size)
            if refine == "pamr":
                scores = pamr(upsample(image[None], size), scores)
            if query_class is not None:
                pred = query_labels(
                    scores[0],
                    query_class,
                    len(data.classes),
                    logit_scale,
                    background_threshold,
                    preset.area_threshold,
                )
            elif background:
                pred = semantic_segmentation(scores, size, logit_scale, background_threshold)[0]
            else:
                pred = scores.argmax(dim=1)[0]
            preds.append(pred)
        return preds

    return predict


def _labelled_chunks(
    data: SegmentationDataset, limit: int | None, batch_size: int
) -> Iterator[tuple[Sequence[SegmentationSample], list[Image.Image], list[torch.Tensor]]]:
    """(samples, RGB images, label maps) of the first `limit` samples, `batch_size` at a
    time."""
    for chunk in _chunks(data.samples[:limit], batch_size):
        originals = [_read_rgb(s.image) for s in chunk]
        labels = [torch.from_numpy(data.read_label(s)) for s in chunk]
        for sample, original, label in zip(chunk, originals, labels, strict=True):
            if (original.height, original.width) != tuple(label.shape):
                raise ValueError(
                    f"{sample.id}: image {(original.height, original.width)} and label "
                    f"{tuple(label.shape)} differ in size"
                )
        yield chunk, originals, labels


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map (256 RGB triples, flattened), for label PNGs."""
    palette = []
    for i in range(256):
        rgb = [0, 0, 0]
        for bit in range(8):
            for channel in range(3):
                rgb[channel] |= ((i >> (3 * bit + channel)) & 1) << (7 - bit)
        palette += rgb
    return palette


def save_prediction(path: Path, pred: torch.Tensor, data: SegmentationDataset) -> None:
    """A predicted label map as a palette PNG holding the dataset's own label ids (class
    k stored as k + 1 in `reduce_zero_label` layouts, where 0 means unlabeled)."""
    ids = pred.cpu().numpy().astype(np.int64) + int(data.layout.reduce_zero_label)
    image = Image.fromarray(ids.astype(np.uint8))
    image.putpalette(voc_palette())  # an L image becomes P, its values the palette indices
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def score_segmentation(
    data: SegmentationDataset,
    predict: Predictor,
    limit: int | None = None,
    batch_size: int = 8,
    save_predictions: str | Path | None = None,
) -> dict:
    """Accumulate the confusion matrix of `predict` over the dataset: `classes`, `iou`
    (per class, NaN where undefined) and `counts`; each prediction saved as
    `save_predictions/<id>.png` when given."""
    num_classes = len(data.classes)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    images = 0
    for samples, originals, labels in _labelled_chunks(data, limit, batch_size):
        for sample, pred, label in zip(samples, predict(originals), labels, strict=True):
            confusion += metrics.confusion_matrix(pred, label.to(pred.device), num_classes)
            if save_predictions is not None:
                save_prediction(Path(save_predictions) / f"{sample.id}.png", pred, data)
        images += len(labels)
    gt_pixels = confusion.sum(1)
    return {
        "classes": data.classes,
        "iou": metrics.iou_from_confusion(confusion),
        "counts": {
            "images": images,
            "pixels": int(gt_pixels.sum()),
            "classes_present": int((gt_pixels > 0).sum()),
            "pixels_per_class": dict(zip(data.classes, gt_pixels.tolist(), strict=True)),
        },
    }


@torch.no_grad()
def analyze(
    model: GEM,
    data: SegmentationDataset,
    protocol: Protocol,
    limit: int | None = None,
    batch_size: int = 8,
    templates: str = "single",
) -> dict:
    """The paper's section 5 metrics on the whole (resized) images' output patch embeddings."""
    device = _device(model)
    background = data.layout.background
    text = model.encode_text(data.classes[1:] if background else data.classes, templates)
    text = text.to(device)
    stats = _Analysis(background)
    for _, originals, labels in _labelled_chunks(data, limit, batch_size):
        images = [prepare(o, protocol, model).to(device) for o in originals]
        for (embeds, _), image, label in zip(
            _whole_images(model, text, images), images, labels, strict=True
        ):
            stats.add(embeds, label.to(device), tuple(image.shape[-2:]), text, model.patch_size)
    return stats.summary()


class _Analysis:
    """Running means of the paper's section 5 metrics over images and object masks.

    Computed on the method's output patch embeddings of the whole (resized) image; a patch's
    label is the ground truth at its centre (nearest), patches on ignore or padding are left
    out; a mask is one class's patches in one image (background excluded for VOC).
    """

    def __init__(self, background: bool):
        self.background = background
        self.similarity: list[float] = []
        self.contrast: list[float] = []
        self.text_contrast: list[float] = []

    def add(self, embeds, label, resized, text, patch_size) -> None:
        gh, gw = embeds.shape[:2]
        ph, pw = patch_size
        small = upsample_nearest(label, resized)
        rows = torch.arange(gh, device=label.device) * ph + ph // 2
        cols = torch.arange(gw, device=label.device) * pw + pw // 2
        inside = (rows[:, None] < resized[0]) & (cols[None, :] < resized[1])
        patch_labels = torch.full((gh, gw), IGNORE, dtype=torch.int64, device=label.device)
        r, c = rows.clamp(max=resized[0] - 1), cols.clamp(max=resized[1] - 1)
        patch_labels = torch.where(inside, small[r[:, None], c[None, :]], patch_labels)
        valid = patch_labels != IGNORE
        patches, patch_labels = embeds[valid].float(), patch_labels[valid]
        if len(patches) < 2:
            return
        self.similarity.append(metrics.patch_patch_similarity(patches))
        for cls in patch_labels.unique().tolist():
            if self.background and cls == 0:
                continue
            mask = patch_labels == cls
            class_text = text[cls - 1 if self.background else cls]
            for values, value in (
                (self.contrast, metrics.object_background_contrast(patches, mask)),
                (
                    self.text_contrast,
                    metrics.text_object_background_contrast(patches, mask, class_text),
                ),
            ):
                if value is not None:
                    values.append(value)

    def summary(self) -> dict:
        def mean(values):
            return sum(values) / len(values) if values else None

        return {
            "patch_patch_similarity": mean(self.similarity),
            "object_background_contrast": mean(self.contrast),
            "text_object_background_contrast": mean(self.text_contrast),
            "images": len(self.similarity),
            "masks": len(self.contrast),
        }


def upsample_nearest(label: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A label map resized with nearest neighbours (ids kept)."""
    return torch.nn.functional.interpolate(label[None, None].float(), size=size, mode="nearest")[
        0, 0
    ].long()


@torch.no_grad()
def _evaluate_points(
    model: GEM, root: str, protocol: Protocol, limit: int | None, batch_size: int, templates: str
) -> dict:
    device = _device(model)
    samples = load_openimages_points(root)[:limit]
    classes = sorted({c for s in samples for c in s.points})
    index = {c: i for i, c in enumerate(classes)}
    text = model.encode_text(classes, templates).to(device) if classes else None
    counts = torch.zeros(len(classes), 3, dtype=torch.int64)  # TP, FP, FN
    points = 0
    for chunk in _chunks(samples, batch_size):
        originals = [_read_rgb(s.image) for s in chunk]
        images = [prepare(o, protocol, model).to(device) for o in originals]
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, image in enumerate(images):
            groups[tuple(image.shape)].append(i)
        for indices in groups.values():
            batch = torch.stack([images[i] for i in indices])
            features = encode(model, batch)
            for j, i in enumerate(indices):
                sample, original = chunk[i], originals[i]
                names = list(sample.points)
                one = ImageFeatures(
                    features.image_embeds[j : j + 1], features.patch_embeds[j : j + 1]
                )
                ids = torch.tensor([index[n] for n in names], device=device)
                logits = features_logits(model, one, text[ids], batch.shape[-2:])
                maps = min_max(upsample(logits, (original.height, original.width)))[0].cpu()
                for name, heatmap in zip(names, maps, strict=True):
                    tp, fp, fn = metrics.point_counts(heatmap, sample.points[name], POINT_THRESHOLD)
                    counts[index[name]] += torch.tensor([tp, fp, fn])
                    points += len(sample.points[name])
    tp, fp, fn = counts.double().unbind(1)
    union = tp + fp + fn
    iou = [t / u if u > 0 else math.nan for t, u in zip(tp.tolist(), union.tolist(), strict=True)]
    return {
        "classes": classes,
        "iou": iou,
        "counts": {"images": len(samples), "classes": len(classes), "points": points},
        "point_threshold": POINT_THRESHOLD,
    }
