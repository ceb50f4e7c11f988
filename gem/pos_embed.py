"""Position-embedding resampling for inputs whose patch grid differs from the training grid."""

import torch
import torch.nn.functional as F


def resample_pos_embed(
    pos_embed: torch.Tensor,
    grid_size: tuple[int, int],
    old_grid_size: tuple[int, int],
    num_prefix_tokens: int = 1,
) -> torch.Tensor:
    """Resample a `[1 + H*W, D]` position embedding to `grid_size`.

    The patch part is resized with bicubic interpolation (antialias on, as in the
    authors' release, which matters even when upsampling); prefix (CLS) tokens are kept.
    """
    if tuple(grid_size) == tuple(old_grid_size):
        return pos_embed
    prefix, patches = pos_embed[:num_prefix_tokens], pos_embed[num_prefix_tokens:]
    dim = patches.shape[-1]
    patches = patches.reshape(1, *old_grid_size, dim).permute(0, 3, 1, 2).float()
    patches = F.interpolate(
        patches, size=tuple(grid_size), mode="bicubic", antialias=True, align_corners=False
    )
    patches = patches.permute(0, 2, 3, 1).reshape(-1, dim).to(pos_embed.dtype)
    return torch.cat([prefix, patches], dim=0)
