"""gem.pamr against an independent computation written from docs/ovss.md section 5
(neighbours by clamped indices, one offset at a time, in float64), and each wrong variant of
its table (section 8) shown to miss it by more than the tolerance."""

import pytest
import torch
import torch.nn.functional as F

import gem

TOL = 1e-4


def at(x: torch.Tensor, dy: int, dx: int, zero_pad: bool = False) -> torch.Tensor:
    """`x[..., r + dy, c + dx]` with out-of-image positions taken from the nearest edge (or
    0 with `zero_pad`)."""
    height, width = x.shape[-2:]
    rows, cols = torch.arange(height) + dy, torch.arange(width) + dx
    out = x[..., rows.clamp(0, height - 1)[:, None], cols.clamp(0, width - 1)[None, :]]
    if zero_pad:
        inside = ((rows >= 0) & (rows < height))[:, None] & ((cols >= 0) & (cols < width))[None]
        out = out * inside
    return out


def reference(image, masks, iterations=10, dilations=(8, 16), mistake=None):
    """PAMR of one image `[K, H, W]` and its masks `[C, H, W]` (same size)."""
    image, m = image.double(), masks.double()
    zero = mistake == "zero_pad"
    offsets = [(d, dy, dx) for d in dilations for dy in (-d, 0, d) for dx in (-d, 0, d)]
    neighbours = [o for o in offsets if o[1:] != (0, 0) or mistake == "centre_included"]
    values = torch.stack([at(image, dy, dx, zero) for _, dy, dx in offsets])  # [9|D|, K, H, W]
    if mistake == "std_per_dilation":
        spread = {d: values[9 * i : 9 * i + 9].std(0) for i, d in enumerate(dilations)}
    else:
        std = values.std(0, correction=0 if mistake == "population_std" else 1)
        spread = dict.fromkeys(dilations, std)
    logits = torch.stack(
        [
            -(image - at(image, dy, dx, zero)).abs() / (1e-8 + 0.1 * spread[d])
            for d, dy, dx in neighbours
        ]
    )  # [P, K, H, W]
    if mistake == "softmax_per_channel":
        weights = logits.softmax(0).mean(1)
    else:
        weights = logits.mean(1).softmax(0)
    for _ in range(iterations - (mistake == "one_iteration_less")):
        m = sum(w * at(m, dy, dx, zero) for w, (_, dy, dx) in zip(weights, neighbours, strict=True))
    return m


def normalized(maps: torch.Tensor) -> torch.Tensor:
    flat = maps.flatten(-2)
    lo, hi = flat.min(-1, keepdim=True)[0], flat.max(-1, keepdim=True)[0]
    return ((flat - lo) / (hi - lo)).reshape(maps.shape)


def smooth(shape: tuple[int, ...], size: tuple[int, int], seed: int) -> torch.Tensor:
    """Random maps with structure: noise at 1/4 resolution upsampled, plus fine noise."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(*shape, size[0] // 4, size[1] // 4, generator=gen)
    up = F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
    return up + 0.1 * torch.randn(*shape, *size, generator=gen)


CASES = [  # (batch, classes, size, iterations, dilations)
    (2, 3, (48, 64), 10, (8, 16)),
    (1, 5, (40, 36), 10, (8, 16)),
    (1, 2, (24, 30), 4, (1, 2, 4)),
]


@pytest.mark.parametrize("batch, classes, size, iterations, dilations", CASES, ids=str)
def test_matches_independent_computation(batch, classes, size, iterations, dilations):
    images = smooth((batch, 3), size, seed=1)
    masks = 0.1 * smooth((batch, classes), size, seed=2)
    got = gem.pamr(images, masks, iterations, dilations)
    assert got.shape == masks.shape and got.dtype == torch.float32
    for i in range(batch):
        want = reference(images[i], masks[i], iterations, dilations)
        assert (normalized(got[i]) - normalized(want).float()).abs().max() <= TOL


def test_small_masks_are_resized_to_the_image():
    images, masks = smooth((1, 3), (32, 48), 3), smooth((1, 2), (8, 12), 4)
    full = F.interpolate(masks, size=(32, 48), mode="bilinear", align_corners=True)
    torch.testing.assert_close(gem.pamr(images, masks, 3), gem.pamr(images, full, 3))


MISTAKES = [
    "zero_pad",
    "one_iteration_less",
    "centre_included",
    "std_per_dilation",
    "population_std",
    "softmax_per_channel",
]


@pytest.mark.parametrize("mistake", MISTAKES)
def test_each_mistake_fails_the_comparison(mistake):
    images = smooth((1, 3), (48, 64), seed=5)
    masks = 0.1 * smooth((1, 4), (48, 64), seed=6)
    got = normalized(gem.pamr(images, masks)[0])
    wrong = normalized(reference(images[0], masks[0], mistake=mistake)).float()
    assert (got - wrong).abs().max() > TOL


def test_input_mistakes_fail_and_units_do_not_matter():
    """Probabilities instead of raw logits and a blurred image move the result; an image in
    [0, 1] instead of normalized units does not."""
    raw = smooth((1, 3), (48, 64), seed=7)
    image = (raw - raw.mean()) / raw.std()
    masks = 0.1 * smooth((1, 4), (48, 64), seed=8)
    got = gem.pamr(image, masks)
    probs = (40 * got).softmax(1)
    wrong = reference(image[0], (40 * masks).softmax(1)[0]).float()
    assert (normalized(probs[0]) - normalized((40 * wrong).softmax(0))).abs().max() > TOL
    blurred = F.interpolate(F.interpolate(image, scale_factor=0.5, mode="bilinear"), (48, 64))
    assert (normalized(got) - normalized(gem.pamr(blurred, masks))).abs().max() > TOL
    unit = (image - image.min()) / (image.max() - image.min())
    assert (normalized(got) - normalized(gem.pamr(unit, masks))).abs().max() <= TOL
