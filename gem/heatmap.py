"""From patch embeddings to heatmaps: cosine logits, upsampling, normalization."""

import torch
import torch.nn.functional as F


def patch_logits(
    patch_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    image_embeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cosine similarity of patches `[B, h, w, E]` to text `[C, E]` (or per image
    `[B, C, E]`) as logits `[B, C, h, w]`; no logit scale.

    With `image_embeds` `[B, E]`, applies CLIP Surgery's feature surgery (redundant
    features, weighted by the image's class probabilities, are removed).
    """
    patches = F.normalize(patch_embeds, dim=-1)
    text = F.normalize(text_embeds, dim=-1).to(patches.dtype)
    if image_embeds is not None:
        return _feature_surgery(patches, text, F.normalize(image_embeds, dim=-1).to(patches.dtype))
    if text.dim() == 2:
        return torch.einsum("bhwe,ce->bchw", patches, text)
    return torch.einsum("bhwe,bce->bchw", patches, text)


def _feature_surgery(
    patches: torch.Tensor, text: torch.Tensor, image: torch.Tensor
) -> torch.Tensor:
    if text.dim() == 2:
        text = text.expand(patches.shape[0], -1, -1)
    prob = (2 * torch.einsum("be,bce->bc", image, text)).softmax(dim=-1)
    weight = prob / prob.mean(dim=-1, keepdim=True)
    logits = torch.einsum("bhwe,bce,bc->bchw", patches, text, weight)
    return logits - logits.mean(dim=1, keepdim=True)


def upsample(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of `[B, C, h, w]` maps to `size` `(H, W)` (align_corners=False)."""
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def min_max(maps: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Per-(image, class) min-max normalization of `[..., H, W]` maps to [0, 1].

    A constant map has no contrast and becomes all zeros.
    """
    flat = maps.flatten(-2)  # amin + amax: 12x faster than aminmax on CPU (torch 2.14)
    lo, hi = flat.amin(-1, keepdim=True), flat.amax(-1, keepdim=True)
    lo, span = lo.unsqueeze(-1), (hi - lo).unsqueeze(-1)
    return (maps - lo).div_(span.clamp(min=eps))  # a constant map: 0 / eps = 0


def heatmaps(logits: torch.Tensor, size: tuple[int, int], normalize: bool = True) -> torch.Tensor:
    """Patch logits `[B, C, h, w]` upsampled to `size`, min-max normalized by default."""
    maps = upsample(logits, size)
    return min_max(maps) if normalize else maps


def semantic_segmentation(
    logits: torch.Tensor,
    size: tuple[int, int],
    logit_scale: float = 100.0,
    background_threshold: float | None = 0.8,
) -> torch.Tensor:
    """VOC-style labels `[B, H, W]` from `[B, C, h, w]` logits: softmax over classes with the
    CLIP logit scale; a pixel whose top probability is under `background_threshold` is
    background (label 0, classes shift to 1..C). `None` keeps every pixel foreground
    (classes 0..C-1), e.g. when a "background" prompt is among the classes."""
    probs = (upsample(logits, size) * logit_scale).softmax(dim=1)
    top, labels = probs.max(dim=1)
    if background_threshold is None:
        return labels
    return torch.where(top < background_threshold, torch.zeros_like(labels), labels + 1)
