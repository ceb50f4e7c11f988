"""The evaluation loop: a GEM model on a dataset under a protocol -> per-class IoU, mIoU,
configuration and counts (and, optionally, the paper's section 5 analysis metrics)."""

import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence

import torch
from PIL import Image

from gem.heatmap import min_max, semantic_segmentation, upsample
from gem.model import GEM, ImageFeatures

from . import metrics
from .datasets import (
    IGNORE,
    OPENIMAGES,
    SegmentationDataset,
    load_openimages_points,
    load_segmentation,
)
from .protocols import Protocol, encode, features_logits, get_protocol, image_logits, prepare

DEFAULT_BACKGROUND_THRESHOLD = 0.8
POINT_THRESHOLD = 0.5


def evaluate(
    model: GEM,
    dataset: str,
    root: str,
    protocol: str = "paper",
    *,
    limit: int | None = None,
    batch_size: int = 8,
    templates: str = "single",
    background_threshold: float = DEFAULT_BACKGROUND_THRESHOLD,
    analysis: bool = False,
    short_side: int | None = None,
    window: int | None = None,
    stride: int | None = None,
) -> dict:
    """Evaluate `model` on `dataset` read from `root` (see `gem.eval.datasets`).

    Returns a JSON-ready dict: `dataset`, `protocol` (its numbers), `method` (the model's
    resolved options), `classes`, `per_class_iou` (None where undefined), `miou`,
    `counts`, `seconds`, and `analysis` when asked (segmentation datasets only).
    """
    start = time.perf_counter()
    model.eval()
    if dataset == OPENIMAGES:
        if protocol != "paper":
            raise ValueError(f"{OPENIMAGES} is evaluated with the paper protocol only")
        if analysis:
            raise ValueError("--analysis needs segmentation masks; not for point labels")
        proto = get_protocol("paper", dataset, short_side)
        result = _evaluate_points(model, root, proto, limit, batch_size, templates)
    else:
        proto = get_protocol(protocol, dataset, short_side, window, stride)
        data = load_segmentation(dataset, root)
        predict = segmentation_predictor(
            model, data, proto, batch_size, templates, background_threshold
        )
        result = score_segmentation(data, predict, limit, batch_size)
        result["logit_scale"] = float(model.model.logit_scale.detach().exp())
        if data.layout.background:
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
    background_threshold: float = DEFAULT_BACKGROUND_THRESHOLD,
) -> Predictor:
    """RGB images -> label maps `[H, W]` at their own size: argmax over the dataset's
    classes, or for a dataset with a background class (VOC) the threshold rule
    (`gem.semantic_segmentation`: softmax at the model's logit scale, background where the
    top probability is under `background_threshold`)."""
    device = _device(model)
    background = data.layout.background
    text = model.encode_text(data.classes[1:] if background else data.classes, templates)
    text = text.to(device)
    logit_scale = float(model.model.logit_scale.detach().exp())

    @torch.no_grad()
    def predict(originals: list[Image.Image]) -> list[torch.Tensor]:
        images = [prepare(o, protocol, model).to(device) for o in originals]
        if protocol.window is None:
            logits = [lg for _, lg in _whole_images(model, text, images)]
        else:
            logits = [image_logits(model, text, im, protocol, batch_size) for im in images]
        preds = []
        for original, lg in zip(originals, logits, strict=True):
            size = (original.height, original.width)
            if background:
                pred = semantic_segmentation(lg[None], size, logit_scale, background_threshold)
            else:
                pred = upsample(lg[None], size).argmax(dim=1)
            preds.append(pred[0])
        return preds

    return predict


def _labelled_chunks(
    data: SegmentationDataset, limit: int | None, batch_size: int
) -> Iterator[tuple[list[Image.Image], list[torch.Tensor]]]:
    """(RGB images, label maps) of the first `limit` samples, `batch_size` at a time."""
    for chunk in _chunks(data.samples[:limit], batch_size):
        originals = [_read_rgb(s.image) for s in chunk]
        labels = [torch.from_numpy(data.read_label(s)) for s in chunk]
        for sample, original, label in zip(chunk, originals, labels, strict=True):
            if (original.height, original.width) != tuple(label.shape):
                raise ValueError(
                    f"{sample.id}: image {(original.height, original.width)} and label "
                    f"{tuple(label.shape)} differ in size"
                )
        yield originals, labels


def score_segmentation(
    data: SegmentationDataset, predict: Predictor, limit: int | None = None, batch_size: int = 8
) -> dict:
    """Accumulate the confusion matrix of `predict` over the dataset: `classes`, `iou`
    (per class, NaN where undefined) and `counts`."""
    num_classes = len(data.classes)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    images = 0
    for originals, labels in _labelled_chunks(data, limit, batch_size):
        for pred, label in zip(predict(originals), labels, strict=True):
            confusion += metrics.confusion_matrix(pred, label.to(pred.device), num_classes)
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
    for originals, labels in _labelled_chunks(data, limit, batch_size):
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
