"""The attention maps of the localization pathway, one function per method.

Each function takes the per-head projections `q, k, v` (`[B, H, N, d]`) of a block's
layer-normed input `x` (`[B, N, D]`) and returns the pathway's per-head output
`[B, H, N, d]`, before heads are merged and the block's output projection is applied.
The GEM function reads like docs/gem.md; `scaled_dot_product_attention` computes each
`softmax(s * a b^T) c` product without materializing more than it needs.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.nn.functional import scaled_dot_product_attention as sdpa


def adaptive_temperature(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """GEM's inverse temperature per image: mean token norm of `x` times `d^-1/2`, `[B,1,1,1]`."""
    s = x.float().norm(dim=-1).mean(dim=-1) * head_dim**-0.5
    return s.view(-1, 1, 1, 1)


def self_self_attention(
    p: torch.Tensor, v: torch.Tensor, inv_temp: torch.Tensor | float, iterations: int, l2_norm: bool
) -> torch.Tensor:
    """One projection's self-self attention applied to `v`: `softmax(s p^ p^T) v` after
    `iterations` rounds of `p <- softmax(s p^ p^T) p^` (`p^` the L2-normalized `p`)."""
    for _ in range(iterations):
        p = F.normalize(p, dim=-1) if l2_norm else p
        p = sdpa(p * inv_temp, p, p, scale=1.0)
    p = F.normalize(p, dim=-1) if l2_norm else p
    return sdpa(p * inv_temp, p, v, scale=1.0)


def gem_attention(
    x: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    ensemble: Sequence[str] = ("q", "k", "v"),
    iterations: int = 1,
    temperature: str | float = "adaptive",
    l2_norm: bool = True,
) -> torch.Tensor:
    """GEM: the mean over the ensemble of self-self attention maps, applied to the raw `v`."""
    if temperature == "adaptive":
        inv_temp = adaptive_temperature(x, q.shape[-1]).to(q.dtype)
    else:
        inv_temp = float(temperature)
    projections = {"q": q, "k": k, "v": v}
    out = sum(
        self_self_attention(projections[name], v, inv_temp, iterations, l2_norm)
        for name in ensemble
    )
    return out / len(ensemble)


def value_value_attention(
    x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """CLIP Surgery's v-v attention: `softmax(v v^T / sqrt(d)) v`."""
    return sdpa(v, v, v)


def value_attention(
    x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """MaskCLIP's value path: the identity attention map, i.e. `v` itself."""
    return v


def kmeans_attention(
    x: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    clusters: int = 8,
    kmeans_iterations: int = 10,
) -> torch.Tensor:
    """GEM's k-means ablation: each token gets the mean raw value of its cluster.

    Tokens are clustered per image and head on their L2-normalized values (cosine
    k-means), initialized deterministically on evenly spaced tokens.
    """
    feats = F.normalize(v.float(), dim=-1)
    n = feats.shape[-2]
    k_clusters = min(clusters, n)
    init = torch.linspace(0, n - 1, k_clusters, device=v.device).round().long()
    centroids = feats[..., init, :]
    for _ in range(kmeans_iterations):
        assign = (feats @ centroids.transpose(-2, -1)).argmax(dim=-1)
        one_hot = F.one_hot(assign, k_clusters).to(feats.dtype)
        centroids = F.normalize(one_hot.transpose(-2, -1) @ feats, dim=-1)
    assign = (feats @ centroids.transpose(-2, -1)).argmax(dim=-1)
    one_hot = F.one_hot(assign, k_clusters).to(feats.dtype)
    means = (one_hot.transpose(-2, -1) @ v.float()) / one_hot.sum(dim=-2).clamp(min=1).unsqueeze(-1)
    return (one_hot @ means).to(v.dtype)


def correlative_attention(
    x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """SCLIP's correlative self-attention: `(softmax(q q^T / sqrt(d)) + softmax(k k^T /
    sqrt(d))) v`, two separately normalized maps added (rows sum to 2)."""
    return sdpa(q, q, v) + sdpa(k, k, v)


def query_query_attention(
    x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """ClearCLIP's q-q attention: `softmax(q q^T / sqrt(d)) v`."""
    return sdpa(q, q, v)


def neighbourhood_attention(
    x: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    grid: tuple[int, int],
    sigma: float = 5.0,
) -> torch.Tensor:
    """NACLIP's attention: `softmax(k k^T / sqrt(d) + Omega) v`, Omega the neighbourhood
    bias of `gaussian_bias` for the patch `grid`."""
    return sdpa(k, k, v, attn_mask=gaussian_bias(grid, sigma, k.device, k.dtype))


def gaussian_bias(
    grid: tuple[int, int], sigma: float, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """NACLIP's Omega `[1 + h*w, 1 + h*w]`: `exp(-((r - r')^2 + (c - c')^2) / (2 sigma^2))`
    between patches at grid rows/columns (r, c) and (r', c'), unnormalized (1 on the
    diagonal) over the whole grid; the class token's row and column are 0. Built in fp32."""
    h, w = grid
    rows, cols = torch.meshgrid(
        torch.arange(h, device=device, dtype=torch.float32),
        torch.arange(w, device=device, dtype=torch.float32),
        indexing="ij",
    )
    rows, cols = rows.reshape(-1), cols.reshape(-1)
    dist2 = (rows[:, None] - rows[None]) ** 2 + (cols[:, None] - cols[None]) ** 2
    bias = F.pad(torch.exp(-dist2 / (2 * sigma**2)), (1, 0, 1, 0))
    return bias.to(dtype)
