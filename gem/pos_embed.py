"""Position-embedding resampling for inputs whose patch grid differs from the training grid.

Two rules, each chosen by a method (`Method.pos_embed` in `gem/methods.py`):

- `antialias` (GEM's release, open_clip): resize the patch part to exactly the new grid,
  bicubic with antialiasing.
- `dino` (SCLIP, ClearCLIP, NACLIP): bicubic driven by the scale factor `(h + 0.1) / g0`
  per axis (a DINO trick), no antialiasing; a grid with as many tokens as the table uses
  the table as stored, even when its shape differs (docs/ovss.md section 1).
"""

import torch
import torch.nn.functional as F

POS_EMBED_RULES = ("antialias", "dino")


def resample_pos_embed(
    pos_embed: torch.Tensor,
    grid_size: tuple[int, int],
    old_grid_size: tuple[int, int],
    num_prefix_tokens: int = 1,
    rule: str = "antialias",
) -> torch.Tensor:
    """Resample a `[1 + H*W, D]` position embedding to `grid_size` by `rule`; prefix (CLS)
    tokens are kept."""
    if rule not in POS_EMBED_RULES:
        raise ValueError(
            f"unknown position-embedding rule {rule!r}; choose one of {POS_EMBED_RULES}"
        )
    (h, w), (oh, ow) = tuple(grid_size), tuple(old_grid_size)
    if (h, w) == (oh, ow) or (rule == "dino" and h * w == oh * ow):
        return pos_embed
    prefix, patches = pos_embed[:num_prefix_tokens], pos_embed[num_prefix_tokens:]
    dim = patches.shape[-1]
    patches = patches.reshape(1, oh, ow, dim).permute(0, 3, 1, 2).float()
    if rule == "antialias":
        patches = F.interpolate(
            patches, size=(h, w), mode="bicubic", antialias=True, align_corners=False
        )
    else:
        patches = F.interpolate(
            patches,
            scale_factor=((h + 0.1) / oh, (w + 0.1) / ow),
            mode="bicubic",
            align_corners=False,
            recompute_scale_factor=False,
        )
    patches = patches.permute(0, 2, 3, 1).reshape(-1, dim).to(pos_embed.dtype)
    return torch.cat([prefix, patches], dim=0)
