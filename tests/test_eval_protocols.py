"""gem.eval.protocols: the protocols' numbers, mmseg's resize rule, sliding windows and
their stitching (constructed cases and against the model on separate tiles)."""

import pytest
import torch

import gem
from gem.eval import get_protocol
from gem.eval.protocols import encode, features_logits, resized_size
from gem.sliding import window_boxes


def test_protocol_numbers():
    assert get_protocol("paper", "voc").as_dict() == {
        "name": "paper",
        "short_side": 448,
        "window": None,
        "stride": None,
        "max_long_side": 2048,
        "pad": "end",
    }
    expected = {"voc": 336, "context59": 336, "ade150": 336, "coco-stuff171": 448}
    for dataset, short in {**expected, "cityscapes": 560}.items():
        protocol = get_protocol("sliding", dataset)
        assert (protocol.short_side, protocol.window, protocol.stride) == (short, 224, 112)
    assert get_protocol("sliding", "voc", 448, 448, 224).window == 448
    with pytest.raises(ValueError):
        get_protocol("sliding", "openimages-points")
    with pytest.raises(ValueError):
        get_protocol("paper", "voc", window=224)
    with pytest.raises(ValueError):
        get_protocol("sliding", "voc", stride=300)


def test_resized_size_keeps_ratio():
    paper = get_protocol("paper", "voc")
    assert resized_size(375, 500, paper) == (448, 597)  # 500 * 448 / 375 = 597.3
    assert resized_size(500, 333, paper) == (673, 448)  # 500 * 448 / 333 = 672.7
    assert resized_size(100, 5000, paper) == (41, 2048)  # long side capped at 2048
    city = get_protocol("sliding", "cityscapes")
    assert resized_size(1024, 2048, city) == (560, 1120)


def test_window_boxes():
    assert window_boxes(336, 448, 224, 112) == [
        (0, 224, 0, 224),
        (0, 224, 112, 336),
        (0, 224, 224, 448),
        (112, 336, 0, 224),
        (112, 336, 112, 336),
        (112, 336, 224, 448),
    ]
    # the last window is moved back inside: rows start at 0 and 300 - 224 = 76
    assert [b[:2] for b in window_boxes(300, 224, 224, 112)] == [(0, 224), (76, 300)]
    assert window_boxes(100, 150, 224, 112) == [(0, 100, 0, 150)]  # smaller than a window


@pytest.fixture(scope="module")
def tiny():
    model = gem.create_gem_model("gemlabel-tiny")
    return model, model.encode_text(["cat", "dog", "sky"])


def test_sliding_matches_separate_tiles(tiny):
    """Windows that tile the image without overlap: the stitched logits are each tile's own
    logits, side by side (the model is batch-invariant, so batching does not matter)."""
    model, text = tiny
    image = torch.randn(3, 16, 48, generator=torch.Generator().manual_seed(0))
    protocol = get_protocol("sliding", "voc", short_side=16, window=16, stride=16)
    with torch.no_grad():
        (stitched,) = gem.sliding_logits(
            model, [image], text, protocol.window, protocol.stride, protocol.pad
        )
        tiles = [
            features_logits(model, encode(model, image[None, :, :, x : x + 16]), text, (16, 16))
            for x in (0, 16, 32)
        ]
    assert stitched.shape == (3, 16, 48)
    torch.testing.assert_close(stitched, torch.cat(tiles, dim=-1)[0], rtol=1e-5, atol=1e-6)


def test_padding_to_the_patch_grid(tiny):
    """A 13 x 21 image is padded to 16 x 24 (patch 8): logits come back at 13 x 21 and equal
    the padded image's logits cropped."""
    model, text = tiny
    image = torch.randn(1, 3, 13, 21, generator=torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(image, (0, 3, 0, 3))
    with torch.no_grad():
        logits = features_logits(model, encode(model, image), text, (13, 21))
        full = features_logits(model, encode(model, padded), text, (16, 24))
    assert logits.shape == (1, 3, 13, 21)
    torch.testing.assert_close(logits, full[..., :13, :21])
