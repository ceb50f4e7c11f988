"""The gallery's pictures: downscaled for display, masks where they belong, size checked."""

import base64
import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.tools.draw import TINT
from pipeline.tools.gallery import overlay


def jpeg(width: int, height: int, color=(100, 100, 100)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, "JPEG", quality=95)
    return out.getvalue()


def picture(uri: str) -> np.ndarray:
    assert uri.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))), int)


def test_large_image_is_shown_downscaled_with_its_masks_in_place():
    mask = np.zeros((900, 1200), np.uint8, order="F")
    mask[:450, 600:] = 1  # the top right quarter
    rle = mask_utils.encode(mask)
    rle = {"size": rle["size"], "counts": rle["counts"].decode()}
    uri, colors = overlay(jpeg(1200, 900), 1200, 900, [rle], ["cat"], side=560)
    shown, color = picture(uri), np.array(colors[0])
    assert shown.shape == (420, 560, 3)
    tinted = (1 - TINT) * np.array([100, 100, 100]) + TINT * color
    assert np.abs(shown[150, 420] - tinted).max() <= 3  # inside: a light tint of its colour
    assert np.abs(shown[150, 281] - color).max() <= 3  # its outline, at the left edge
    assert np.abs(shown[300, 100] - [100, 100, 100]).max() <= 3  # outside: untouched
    assert np.abs(shown[215, 420] - [100, 100, 100]).max() <= 3  # below its bottom edge
    small, _ = overlay(jpeg(64, 48), 64, 48, [], [], side=560)
    assert picture(small).shape == (420, 560, 3)  # small images are enlarged to be seen


def test_source_of_another_size_than_the_masks_is_refused():
    with pytest.raises(ValueError, match="the source image is 1200x900, its masks 1000x900"):
        overlay(jpeg(1200, 900), 1000, 900, [], [], side=560)


def test_rows_are_grouped_by_shard():
    from pipeline.tools.gallery import _by_shard

    images = pa.table({"shard": ["a.tar", "a.tar", "b.tar", "c.tar", "c.tar", "c.tar"]})
    assert _by_shard(images) == {"a.tar": (0, 2), "b.tar": (2, 3), "c.tar": (3, 6)}
    assert _by_shard(images.slice(0, 0)) == {}


def test_a_picture_that_fails_costs_only_its_pixels():
    from pipeline.tools.gallery import _item

    row = {"key": "k", "width": 1000, "height": 900}
    masks = [{"label": "cat", "score": 0.5, "area": 3, "mask": {"size": [900, 1000]}}]
    item = _item(row, masks, [("jpg", jpeg(1200, 900))], side=560)
    assert "(no pixels: ValueError: the source image is 1200x900, its masks 1000x900)" in item
    assert "cat 0.50" in item and "<img" not in item
