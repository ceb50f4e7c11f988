"""PAMR, pixel-adaptive mask refinement (Araslanov & Roth 2020, `1-stage-wseg`), as SCLIP
and NACLIP run it on their dense scores (docs/ovss.md section 5).

Each pixel's mask values are replaced, `iterations` times, by an affinity-weighted mean of
its neighbours at the given dilations (8 per dilation, the pixel itself excluded; borders
replicate). Affinities come from the image: per channel `-|I(p) - I(n)| / (1e-8 + 0.1 s)`,
`s` the unbiased standard deviation of the pixel's 3x3 neighbourhoods at all dilations
(centre included once per dilation), averaged over channels, softmax over the neighbours.
"""

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F


def _shifted(x: torch.Tensor, dilations: Sequence[int], centre: bool) -> Iterator[torch.Tensor]:
    """Views of `x` `[B, C, H, W]` shifted to each neighbour offset `(dy, dx)` in
    `{-d, 0, d}^2` per dilation d (replicate padding), `(0, 0)` only when `centre`."""
    pad = max(dilations)
    height, width = x.shape[-2:]
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    for d in dilations:
        for dy in (-d, 0, d):
            for dx in (-d, 0, d):
                if centre or (dy, dx) != (0, 0):
                    yield padded[..., pad + dy : pad + dy + height, pad + dx : pad + dx + width]


def pamr_affinity(images: torch.Tensor, dilations: Sequence[int] = (8, 16)) -> torch.Tensor:
    """Neighbour weights `[B, P, H, W]` (P = 8 per dilation, summing to 1 over P) of images
    `[B, K, H, W]`, in fp32."""
    images = images.float()
    spread = torch.stack(list(_shifted(images, dilations, centre=True)), dim=2).std(
        dim=2, keepdim=True
    )
    neighbours = torch.stack(list(_shifted(images, dilations, centre=False)), dim=2)
    logits = -(images[:, :, None] - neighbours).abs() / (1e-8 + 0.1 * spread)
    return logits.mean(dim=1).softmax(dim=1)


def pamr(
    images: torch.Tensor,
    masks: torch.Tensor,
    iterations: int = 10,
    dilations: Sequence[int] = (8, 16),
) -> torch.Tensor:
    """Refine masks `[B, C, h, w]` (raw scores, e.g. cosine logits) with images `[B, K, H, W]`:
    `[B, C, H, W]` in fp32 (masks are first resized bilinearly, `align_corners=True`, to the
    image size when they differ).

    Memory: the image side holds `O(B * K * 9 * len(dilations) * H * W)`; the propagation
    holds two copies of the masks plus their padded copy, `O(B * C * H * W)`, whatever the
    number of neighbours. Refine a few classes' maps (e.g. each image's top-k), not a large
    vocabulary's.
    """
    if iterations < 0 or not dilations or min(dilations) < 1:
        raise ValueError("need iterations >= 0 and dilations >= 1")
    masks = masks.float()
    if masks.shape[-2:] != images.shape[-2:]:
        masks = F.interpolate(masks, size=images.shape[-2:], mode="bilinear", align_corners=True)
    weights = pamr_affinity(images, dilations).unbind(dim=1)
    for _ in range(iterations):
        refined = torch.zeros_like(masks)
        for weight, neighbour in zip(
            weights, _shifted(masks, dilations, centre=False), strict=True
        ):
            refined.addcmul_(weight[:, None], neighbour)
        masks = refined
    return masks
