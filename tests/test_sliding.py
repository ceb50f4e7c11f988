"""gem.sliding_logits (all windows of a batch of images in one forward) against the
authors' loop written from docs/ovss.md section 1: one window at a time, batch 1."""

import pytest
import torch
import torch.nn.functional as F

import gem
from tests.test_ovss import MODEL, normalized

TOL = 1e-4


@pytest.fixture(scope="module")
def clip():
    return gem.create_clip(MODEL)[0]


def one_at_a_time(model, image, text, window, stride, pad):
    """The authors' slide inference for one image `[3, H, W]`: `[C, H, W]`."""
    height, width = image.shape[-2:]
    rows = max(height - window + stride - 1, 0) // stride + 1
    cols = max(width - window + stride - 1, 0) // stride + 1
    out = torch.zeros(len(text), height, width)
    count = torch.zeros(1, height, width)
    p = model.patch_size[0]
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + window, height), min(c * stride + window, width)
            y1, x1 = max(y2 - window, 0), max(x2 - window, 0)
            crop = image[None, :, y1:y2, x1:x2]
            h, w = crop.shape[-2:]
            if pad == "centre":  # ClearCLIP: zeros split evenly, the extra pixel right/bottom
                ph, pw = -h % p, -w % p
                left, top = pw // 2, ph // 2
                crop = F.pad(crop, (left, pw - left, top, ph - top))
            logits = model(crop, text)
            logits = F.interpolate(logits, size=crop.shape[-2:], mode="bilinear")
            if pad == "centre":
                logits = logits[..., top : top + h, left : left + w]
            out[:, y1:y2, x1:x2] += logits[0]
            count[:, y1:y2, x1:x2] += 1
    return out / count


@pytest.mark.parametrize(
    "method, window, stride",
    [("sclip", 224, 112), ("clearclip", 448, 224), ("naclip", 224, 112), ("naclip", 160, 100)],
)
@torch.no_grad()
def test_batched_equals_one_at_a_time(clip, method, window, stride):
    """Three images of different sizes (one smaller than a window, with sides that are no
    multiple of the patch) in one call."""
    model = gem.GEM(clip, method=method)
    text = F.normalize(torch.randn(4, 64, generator=torch.Generator().manual_seed(0)), dim=-1)
    gen = torch.Generator().manual_seed(1)
    images = [torch.randn(3, *size, generator=gen) for size in [(336, 500), (250, 203), (336, 500)]]
    pad = gem.WINDOWS[method].pad
    got = gem.sliding_logits(model, images, text, window, stride, pad)
    for image, logits in zip(images, got, strict=True):
        want = one_at_a_time(model, image, text, window, stride, pad)
        assert logits.shape == want.shape
        assert (normalized(logits) - normalized(want)).abs().max() <= TOL
    chunked = gem.sliding_logits(model, images, text, window, stride, pad, max_windows=5)
    for a, b in zip(got, chunked, strict=True):
        assert (normalized(a) - normalized(b)).abs().max() <= TOL


@torch.no_grad()
def test_whole_image_and_per_image_text(clip):
    model = gem.GEM(clip, method="naclip")
    images = torch.randn(2, 3, 200, 264, generator=torch.Generator().manual_seed(2))
    text = F.normalize(torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(3)), dim=-1)
    got = gem.sliding_logits(model, images, text, None)
    for i in range(2):
        want = F.interpolate(model(images[i : i + 1], text[i]), size=(200, 264), mode="bilinear")
        assert (normalized(got[i]) - normalized(want[0])).abs().max() <= TOL


def test_presets_and_boxes():
    assert gem.WINDOWS == {
        "sclip": gem.Windows(224, 112, "none"),
        "clearclip": gem.Windows(448, 224, "centre"),
        "naclip": gem.Windows(224, 112, "none"),
    }
    assert gem.window_boxes(300, 224, 224, 112) == [(0, 224, 0, 224), (76, 300, 0, 224)]
    with pytest.raises(ValueError):
        gem.window_boxes(300, 224, 224, 300)
