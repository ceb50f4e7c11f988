import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gem


def test_min_max_per_image_and_class():
    maps = torch.randn(2, 3, 5, 7) * torch.tensor([1.0, 10.0, 0.1]).view(1, 3, 1, 1)
    out = gem.min_max(maps)
    flat = out.flatten(-2)
    assert torch.allclose(flat.min(-1).values, torch.zeros(2, 3))
    assert torch.allclose(flat.max(-1).values, torch.ones(2, 3))


def test_min_max_constant_map_is_zero_not_nan():
    maps = torch.full((1, 2, 4, 4), 3.0)
    out = gem.min_max(maps)
    assert torch.isfinite(out).all() and out.abs().max() == 0


def test_upsample_is_bilinear_without_corner_alignment():
    logits = torch.tensor([[[[0.0, 1.0]]]])
    out = gem.upsample(logits, (1, 4))
    assert torch.allclose(out, torch.tensor([[[[0.0, 0.25, 0.75, 1.0]]]]))


def test_heatmap_orientation_non_square():
    """Row-major patch grid: a patch embedding in row r, column c lights up that spot."""
    patches = torch.zeros(1, 3, 5, 4)
    patches[..., 0] = 1.0
    patches[0, 2, 4] = torch.tensor([0.0, 1.0, 0.0, 0.0])
    text = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    logits = gem.patch_logits(patches, text)
    assert logits.shape == (1, 1, 3, 5)
    assert logits[0, 0].argmax() == 2 * 5 + 4
    maps = gem.heatmaps(logits, (30, 50))
    row, col = np.unravel_index(maps[0, 0].argmax().item(), (30, 50))
    assert 20 <= row < 30 and 40 <= col < 50


def test_patch_logits_are_cosines():
    patches = torch.randn(2, 3, 4, 8) * 5
    text = torch.randn(6, 8) * 3
    logits = gem.patch_logits(patches, text)
    want = F.normalize(patches, dim=-1) @ F.normalize(text, dim=-1).T
    torch.testing.assert_close(logits, want.permute(0, 3, 1, 2))
    assert logits.abs().max() <= 1 + 1e-6


def test_feature_surgery_matches_clip_surgery_definition():
    torch.manual_seed(0)
    patches, text, image = torch.randn(2, 3, 4, 8), torch.randn(5, 8), torch.randn(2, 8)
    got = gem.patch_logits(patches, text, image_embeds=image)
    p = F.normalize(patches, dim=-1).reshape(2, 12, 1, 8)
    t = F.normalize(text, dim=-1)
    prob = (F.normalize(image, dim=-1) @ t.T * 2).softmax(-1)
    w = prob / prob.mean(-1, keepdim=True)
    feats = p * t.reshape(1, 1, 5, 8) * w.reshape(2, 1, 5, 1)
    want = (feats - feats.mean(2, keepdim=True)).sum(-1)  # [B, n, C]
    torch.testing.assert_close(got, want.permute(0, 2, 1).reshape(2, 5, 3, 4))


@pytest.mark.parametrize("threshold", [0.8, None])
def test_semantic_segmentation_background_rule(threshold):
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 0, 0, 0] = 0.5  # confident class 0 at the top-left patch
    labels = gem.semantic_segmentation(logits, (2, 2), background_threshold=threshold)
    if threshold is None:
        assert labels[0, 0, 0] == 0
    else:
        assert labels[0, 0, 0] == 1  # class 0 -> label 1, 0 is background
        assert (labels[0].flatten()[1:] == 0).all()  # a 50/50 split is background
