"""Masks drawn for the gallery and the report (pipeline.tools.draw): a colour never close to
the object's own, distinct colours per image, the object's colour still visible under the
tint, outlines, and labels inside the picture."""

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from pipeline.tools.draw import (
    PALETTE,
    TINT,
    _fit,
    _label_box,
    draw_masks,
    font,
    lab,
    outline,
    pick_colors,
)

BLUE, RED, YELLOW = (0, 90, 230), (220, 30, 40), (240, 220, 30)


def scene(colors: list[tuple[int, int, int]], size: int = 120) -> tuple[np.ndarray, list]:
    """A grey picture with one square object per colour, and their masks."""
    pixels = np.full((size, size, 3), 128, np.uint8)
    masks = []
    for i, color in enumerate(colors):
        mask = np.zeros((size, size), bool)
        mask[10 + 30 * i : 35 + 30 * i, 10 + 30 * i : 35 + 30 * i] = True
        pixels[mask] = color
        masks.append(mask)
    return pixels, masks


def delta_e(a, b) -> float:
    return float(np.linalg.norm(lab(np.array(a)) - lab(np.array(b))))


@pytest.mark.parametrize("obj", [BLUE, RED, YELLOW, (30, 160, 60), (150, 40, 170)])
def test_colour_is_far_from_the_object(obj):
    pixels, masks = scene([obj])
    (color,) = pick_colors(pixels, masks)
    # the farthest palette colour: no other palette colour is farther from the object
    assert delta_e(color, obj) == max(delta_e(c, obj) for c in PALETTE)
    assert delta_e(color, obj) > 80  # far: never read as a shade of the object


def test_a_blue_object_is_not_painted_red_blue():
    """The old fixed order painted the first mask crimson: on a blue cross, purple."""
    pixels, masks = scene([BLUE])
    (color,) = pick_colors(pixels, masks)
    assert color != PALETTE[0]
    drawn = np.asarray(draw_masks(Image.fromarray(pixels), masks, ["blue cross"], [color]))
    inside = drawn[30, 30].astype(float)  # inside the mask, off its outline and label
    # the tint keeps the object's own colour: still nearer blue than the mask colour
    assert delta_e(inside, BLUE) < delta_e(inside, color)
    assert np.allclose(inside, (1 - TINT) * np.array(BLUE) + TINT * np.array(color), atol=1)


def test_masks_of_one_image_get_distinct_colours():
    pixels, masks = scene([BLUE, BLUE, RED])
    colors = pick_colors(pixels, masks)
    assert len(set(colors)) == 3


def test_outline_is_drawn_in_the_mask_colour():
    pixels, masks = scene([BLUE])
    color = (255, 225, 25)
    drawn = np.asarray(draw_masks(Image.fromarray(pixels), masks, [""], [color]))
    assert tuple(drawn[34, 20]) == color  # the bottom border row of the square
    assert tuple(drawn[60, 60]) == (128, 128, 128)  # outside: untouched


def test_outline_is_pils_min_filter_border():
    """The mask's pixels that PIL's MinFilter (erosion, edges extended) removes: random
    masks and rectangles of all sizes, also touching the picture's edges."""
    rng = np.random.default_rng(0)
    for i in range(120):
        h, w = rng.integers(1, 50, 2)
        mask = rng.random((h, w)) < rng.random()
        if i % 2:
            y, x = rng.integers(0, h), rng.integers(0, w)
            mask = np.zeros((h, w), bool)
            mask[y : y + rng.integers(1, 30), x : x + rng.integers(1, 30)] = True
        for width in (1, 2, 4):
            inner = Image.fromarray(mask.astype(np.uint8) * 255).filter(
                ImageFilter.MinFilter(2 * width + 1)
            )
            np.testing.assert_array_equal(outline(mask, width), mask & (np.asarray(inner) == 0))


@pytest.mark.parametrize(
    "label, at",
    [
        ("purple circle 0.97", (110, 5)),  # at the right edge
        ("red cross 0.5", (3, 115)),  # at the bottom edge
        ("a very long class name that is wider than the whole picture 0.42", (0, 0)),
    ],
)
def test_labels_stay_inside_the_picture(label, at):
    size = (120, 120)
    draw = ImageDraw.Draw(Image.new("RGB", size))
    text_font, text = _fit(draw, label, 14, size[0] - 6)
    box = _label_box(draw, text, text_font, at, size, [])
    assert 0 <= box[0] and box[2] < size[0] and 0 <= box[1] and box[3] < size[1], box
    assert draw.textlength(text, font=text_font) <= size[0] - 6
    assert text == label or text.endswith("…")


def test_labels_do_not_cover_each_other():
    draw = ImageDraw.Draw(Image.new("RGB", (200, 200)))
    first = _label_box(draw, "red cross", font(14), (10, 10), (200, 200), [])
    second = _label_box(draw, "blue cross", font(14), (12, 12), (200, 200), [first])
    assert second[1] > first[3]
