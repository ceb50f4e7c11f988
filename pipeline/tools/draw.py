"""Masks drawn on their image so that they read as masks, not as the object's colour: a
light tint inside a solid outline, a label on the image, and colours picked against the
image.

Colour choice: per mask (in the order given, highest score first), of the PALETTE colours
not used yet on this image, the one farthest in CIELAB from the mean colour of the pixels
under the mask. A blue object gets a yellow or orange outline, never a blue-ish tint that
mixes into "purple"; two masks of one image never share a colour while the palette lasts.
Labels sit at the top left of their mask's box, inside the picture (moved in, and down
past labels placed before), as text on a box of the mask's colour, in black or white,
whichever contrasts more.
"""

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image, ImageDraw, ImageFont

# distinct hues at several lightnesses (Sasha Trubetskoy's list, without grey, black, white)
PALETTE = (
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (170, 110, 40),
    (128, 0, 0),
    (0, 0, 128),
)
TINT = 0.22  # opacity of a mask's colour inside it: the object's own colour stays visible


def lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB (0-255, [..., 3]) to CIELAB (D65)."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    xyz = c @ np.array(
        [[0.4124, 0.2126, 0.0193], [0.3576, 0.7152, 0.1192], [0.1805, 0.0722, 0.9505]]
    )
    xyz = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 216 / 24389, np.cbrt(xyz), (24389 / 27 * xyz + 16) / 116)
    return np.stack(
        [116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])],
        axis=-1,
    )


def pick_colors(pixels: np.ndarray, masks: list[np.ndarray]) -> list[tuple[int, int, int]]:
    """One colour per mask (see the module doc); `pixels` [H, W, 3] uint8, masks [H, W]
    bool. Past the palette's length, colours repeat."""
    palette = lab(np.array(PALETTE))
    free = list(range(len(PALETTE)))
    chosen = []
    for mask in masks:
        if not free:
            free = list(range(len(PALETTE)))
        under = pixels[mask] if mask.any() else pixels.reshape(-1, 3)
        mean = lab(under.reshape(-1, 3).mean(axis=0))
        best = max(free, key=lambda i: float(np.linalg.norm(palette[i] - mean)))
        free.remove(best)
        chosen.append(PALETTE[best])
    return chosen


def font(size: int) -> ImageFont.ImageFont:
    """Pillow's bundled font at `size` pixels (its bitmap font where FreeType is missing)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def outline(mask: np.ndarray, width: int) -> np.ndarray:
    """The inner border of a boolean mask, `width` pixels wide: its pixels with a pixel
    outside the mask in the square of side `2 * width + 1` around them, the image's edge
    pixels extended beyond it (PIL's MinFilter erosion, separable: 8x faster)."""
    size = 2 * width + 1
    inner = np.pad(mask, width, mode="edge")
    inner = sliding_window_view(inner, size, axis=0).all(-1)
    inner = sliding_window_view(inner, size, axis=1).all(-1)
    return mask & ~inner


def draw_masks(
    image: Image.Image,
    masks: list[np.ndarray],
    labels: list[str],
    colors: list[tuple[int, int, int]],
) -> Image.Image:
    """`image` (RGB, the masks' size) with each mask tinted, outlined and labeled."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32).copy()
    for mask, color in zip(masks, colors, strict=True):
        pixels[mask] = (1 - TINT) * pixels[mask] + TINT * np.array(color, np.float32)
    picture = Image.fromarray(pixels.astype(np.uint8))
    width = max(2, round(max(picture.size) / 140))
    for mask, color in zip(masks, colors, strict=True):
        border = outline(mask.astype(bool), width)
        picture.paste(color, mask=Image.fromarray(border.astype(np.uint8) * 255))
    draw = ImageDraw.Draw(picture)
    size = max(12, round(max(picture.size) / 22))
    placed: list[tuple[int, int, int, int]] = []
    for mask, label, color in zip(masks, labels, colors, strict=True):
        if not mask.any():
            continue
        text_font, text = _fit(draw, label, size, picture.size[0] - 6)
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        box = _label_box(draw, text, text_font, (cols[0], rows[0]), picture.size, placed)
        placed.append(box)
        ink = (0, 0, 0) if lab(np.array(color))[0] > 60 else (255, 255, 255)
        draw.rectangle(box, fill=color)
        draw.text((box[0] + 3, box[1] + 1), text, font=text_font, fill=ink)
    return picture


def _fit(draw, label: str, size: int, width: int) -> tuple[ImageFont.ImageFont, str]:
    """A font and text for `label` no wider than `width` pixels: smaller type down to 3/4
    of `size`, then the label shortened with an ellipsis."""
    smallest = max(9, size * 3 // 4)
    for px in range(size, smallest - 1, -1):
        if draw.textlength(label, font=font(px)) <= width:
            return font(px), label
    text_font, text = font(smallest), label
    while len(text) > 1 and draw.textlength(text + "…", font=text_font) > width:
        text = text[:-1]
    return text_font, text.rstrip() + "…"


def _label_box(draw, label, text_font, at, size, placed) -> tuple[int, int, int, int]:
    """Where a label goes: at `at`, inside the picture, below the labels it would cover."""
    left, top, right, bottom = draw.textbbox((0, 0), label, font=text_font)
    w, h = right + 6, bottom + 3
    x = int(min(max(0, at[0]), max(0, size[0] - w)))
    y = int(min(max(0, at[1]), max(0, size[1] - h)))
    for _ in range(len(placed) + 1):
        hit = [b for b in placed if x < b[2] and b[0] < x + w and y < b[3] and b[1] < y + h]
        if not hit:
            break
        y = max(b[3] for b in hit) + 1
        if y + h > size[1]:
            y = max(0, size[1] - h)
            break
    return x, y, x + w - 1, y + h - 1
