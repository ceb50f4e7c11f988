"""`GEM`: an open_clip vision transformer with a training-free localization pathway.

The CLIP path runs unchanged (its pooled token is the usual image embedding). Over the
last `depth` blocks a second, residual-only pathway accumulates the method's attention
output, each block reading the CLIP path's tokens (docs/gem.md):

    z = h_{L-m} + sum_{l > L-m} out_proj(attention_l(LN1_l(h_{l-1})))

Methods that replace the last block (SCLIP, ClearCLIP, NACLIP; depth 1) may drop the
`h_{L-m}` term (`residual=False`) and add the last block's FFN, `z <- z + MLP(LN2 z)`
(`ffn=True`). In the patched blocks the q/k/v projection is computed once and shared by
both paths.
"""

from dataclasses import dataclass

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn

from .heatmap import patch_logits
from .methods import get_method, resolve_options
from .pos_embed import resample_pos_embed
from .text import SINGLE_TEMPLATE, Templates, encode_class_names


@dataclass
class ImageFeatures:
    """What one forward pass gives: the CLIP image embedding `[B, E]` (as open_clip's
    `encode_image`, unnormalized) and the pathway's patch embeddings `[B, h, w, E]`."""

    image_embeds: torch.Tensor
    patch_embeds: torch.Tensor


class GEM(nn.Module):
    """Wrap an open_clip CLIP model for open-vocabulary localization.

    Args:
        model: an open_clip CLIP model with a ViT image tower.
        method: `gem` (default), `clip`, `maskclip`, `clip_surgery`, `gem_kmeans`,
            `sclip`, `clearclip` or `naclip` (`gem.list_methods()`).
        depth: number of final blocks feeding the pathway (gem default 6).
        tokenizer: open_clip tokenizer for `encode_text` (default: open_clip's CLIP BPE).
        **options: method options, e.g. for gem `iterations`, `temperature`
            ("adaptive" or a number), `ensemble` (subset of "q", "k", "v"), `l2_norm`;
            for sclip/clearclip/naclip `residual`, `ffn`, and naclip's `sigma`.
    """

    def __init__(
        self,
        model: nn.Module,
        method: str = "gem",
        depth: int | None = None,
        tokenizer=None,
        **options,
    ):
        super().__init__()
        visual = getattr(model, "visual", None)
        _check_supported(visual)
        self.model = model
        self.method = get_method(method)
        self.options = resolve_options(
            self.method, len(visual.transformer.resblocks), depth, options
        )
        self.depth = self.options.pop("depth")
        self.feature_surgery = self.options.pop("feature_surgery")
        self.residual = self.options.pop("residual", True)
        self.ffn = self.options.pop("ffn", False)
        self.tokenizer = tokenizer or open_clip.get_tokenizer(
            "ViT-B-32", context_length=getattr(model, "context_length", 77)
        )

    @property
    def visual(self) -> VisionTransformer:
        return self.model.visual

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(self.visual.patch_size)

    @property
    def config(self) -> dict:
        """The method and its resolved options (for manifests and caches)."""
        opts = {k: list(v) if isinstance(v, tuple) else v for k, v in self.options.items()}
        block = {"residual": self.residual, "ffn": self.ffn} if "ffn" in self.method.options else {}
        return {
            "method": self.method.name,
            "depth": self.depth,
            "feature_surgery": self.feature_surgery,
            **block,
            **opts,
        }

    def grid_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """Patch grid `(h, w)` for an input of `image_size` `(H, W)`."""
        return image_size[0] // self.patch_size[0], image_size[1] // self.patch_size[1]

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        visual = self.visual
        x, grid = patch_embed(visual.conv1, images)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)
        pos = resample_pos_embed(
            visual.positional_embedding, grid, tuple(visual.grid_size), rule=self.method.pos_embed
        )
        x = x + pos.to(x.dtype)
        return visual.ln_pre(visual.patch_dropout(x))

    def encode_tokens(
        self, images: torch.Tensor, clip_tokens: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the image tower once: the CLIP path's final tokens and the pathway's tokens,
        both `[B, 1 + h*w, D]` (class token first), before `ln_post` and projection.

        With `clip_tokens=False` and class-token pooling, the CLIP path's last block updates
        the class token alone (all the pooled embedding needs), and its output is `[B, 1, D]`.
        """
        blocks = self.visual.transformer.resblocks
        x = self._embed(images)
        options = self.options
        if self.method.uses_grid:
            options = {**options, "grid": self.grid_size(tuple(images.shape[-2:]))}
        first = len(blocks) - self.depth
        for block in blocks[:first]:
            x = block(x)
        z = x if self.residual else 0
        class_only = not clip_tokens and self.visual.pool_type == "tok"
        for i, block in enumerate(blocks[first:], start=first + 1):
            x, path = self._patched_block(block, x, class_only and i == len(blocks), options)
            z = z + path
        if self.ffn:
            last = blocks[-1]
            z = z + last.ls_2(last.mlp(last.ln_2(z)))
        return x, z

    def encode_image(self, images: torch.Tensor) -> ImageFeatures:
        """Run the image tower once: the CLIP embedding and the pathway's patch embeddings."""
        visual = self.visual
        h, w = self.grid_size(tuple(images.shape[-2:]))
        x, z = self.encode_tokens(images, clip_tokens=False)
        pooled, _ = visual._pool(x)
        tokens = visual.ln_post(z[:, 1:])
        if visual.proj is not None:
            pooled = pooled @ visual.proj
            tokens = tokens @ visual.proj
        return ImageFeatures(pooled, tokens.reshape(tokens.shape[0], h, w, -1))

    def _patched_block(
        self, block: ResidualAttentionBlock, x: torch.Tensor, class_only: bool, options: dict
    ):
        attn = block.attn
        batch, tokens, width = x.shape
        heads = attn.num_heads
        y = block.ln_1(x)
        qkv = F.linear(y, attn.in_proj_weight, attn.in_proj_bias)
        q, k, v = qkv.view(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4)

        def project(o: torch.Tensor) -> torch.Tensor:
            o = o.transpose(1, 2).flatten(2)
            return block.ls_1(F.linear(o, attn.out_proj.weight, attn.out_proj.bias))

        path = project(self.method.attention(y, q, k, v, **options))
        if class_only:  # the CLIP path goes on with its class token only
            x, q = x[:, :1], q[:, :, :1]
        x = x + project(F.scaled_dot_product_attention(q, k, v))
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
        return x, path

    @torch.no_grad()
    def encode_text(
        self, class_names: list[str], templates: Templates = SINGLE_TEMPLATE
    ) -> torch.Tensor:
        """Normalized, template-averaged text embeddings `[C, E]` for `class_names`."""
        return encode_class_names(self.model, self.tokenizer, class_names, templates)

    def forward(self, images: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """Patch logits `[B, C, h, w]`: cosine similarity of each patch to each text embedding."""
        features = self.encode_image(images)
        return patch_logits(
            features.patch_embeds,
            text_embeds,
            image_embeds=features.image_embeds if self.feature_surgery else None,
        )


def patch_embed(conv: nn.Conv2d, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """A ViT's patch embedding `[B, h*w, D]` and its grid `(h, w)`: its non-overlapping
    convolution computed as one matrix product over the unfolded patches (the same sums;
    on Hopper GPUs cuDNN's kernel for this convolution takes 5% of GEM's forward, the
    product a fraction of that)."""
    (ph, pw), (batch, channels, height, width) = conv.kernel_size, images.shape
    h, w = height // ph, width // pw
    patches = images[:, :, : h * ph, : w * pw].reshape(batch, channels, h, ph, w, pw)
    patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(batch, h * w, channels * ph * pw)
    return F.linear(patches, conv.weight.flatten(1), conv.bias), (h, w)


def _check_supported(visual) -> None:
    if not isinstance(visual, VisionTransformer):
        raise TypeError(
            f"GEM needs an open_clip model with a ViT image tower (model.visual a "
            f"VisionTransformer), got {type(visual).__name__}"
        )
    conv = visual.conv1
    if (
        tuple(conv.stride) != tuple(conv.kernel_size)
        or tuple(conv.padding) != (0, 0)
        or tuple(conv.dilation) != (1, 1)
        or conv.groups != 1
    ):
        raise TypeError("GEM needs a ViT whose patch embedding is a non-overlapping convolution")
    if visual.attn_pool is not None:
        raise TypeError("GEM does not support ViTs with an attentional pooler (e.g. CoCa)")
    if not visual.transformer.batch_first:
        raise TypeError("GEM needs a batch-first open_clip transformer (open_clip >= 2.26)")
    for block in visual.transformer.resblocks:
        if type(block) is not ResidualAttentionBlock or not isinstance(
            block.attn, nn.MultiheadAttention
        ):
            raise TypeError(
                "GEM supports open_clip's standard ResidualAttentionBlock with "
                f"nn.MultiheadAttention, got {type(block).__name__}"
            )
