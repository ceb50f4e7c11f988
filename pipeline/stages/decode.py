"""Decode stage: image bytes -> RGB pixels at the model input size, bad input -> error rows.

Rules (one per decoded image):
- Only common raster formats are parsed (`ALLOWED_FORMATS`; never EPS/PDF, which would
  run Ghostscript), identified by content, not by the member's extension.
- The size declared in the header is checked against `max_pixels` before any pixel is
  decoded; truncated data is an error (PIL's LOAD_TRUNCATED_IMAGES is never honoured).
- EXIF orientation is applied (an unreadable EXIF block is ignored); `width`/`height` are
  the size after that transpose.
- For the model, a JPEG much larger than its input is decoded at a reduced scale
  (libjpeg's DCT scaling, 1/2 to 1/8) that keeps both sides at least the input size: for
  a 448 px input about 2x faster at 1920x1080 and 3-4x at 12 MP, 1-3 levels from the full
  decode on average after the resize (`benchmarks/jpeg_decode.py`). `width`/`height`
  stay the full size.
- The resize to the model input is PIL's antialiased bicubic filter as torch's uint8
  kernel computes it (`gem.resize_uint8`): 3-7x faster than PIL's own, within 2 levels of
  it on under 1% of the pixels.
- Multi-frame images (GIF, APNG, WebP, TIFF, MPO) use their first frame.
- With `--jpeg-stage actor`, plain JPEGs (baseline, YCbCr or gray, ending in EOI, within
  the limit: `probe_device_jpeg`, header only) are left to the labeling actor, which
  decodes them on its device (`decode_jpegs`: torchvision's nvjpeg path on a GPU) and
  applies the EXIF orientation there (`exif_orient`, PIL's transposes); all else is
  decoded here by these rules.
- Modes -> RGB: alpha (RGBA, LA, PA, P with transparency, ...) is composited onto white;
  16-bit (I;16*, and I, read as 16-bit) is scaled by 255/65535 with rounding; F is
  scaled by 255 when all values lie in [0, 1], else clipped to [0, 255]; CMYK, YCbCr, L,
  1, P use PIL's conversion.

torch (and gem) are imported by the functions that use them (`decode_jpegs`, `_resize`), so
that the tools that only decode images with PIL (report, gallery, COCO export) do not load
them.
"""

import contextlib
import io
import re
import threading
import warnings
from collections import Counter
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps, UnidentifiedImageError

from pipeline.stages.options import DEFAULT_MAX_PIXELS

if TYPE_CHECKING:
    import torch

# Preference order when a sample has several image members.
IMAGE_EXTENSIONS = (
    "jpg",
    "jpeg",
    "jpe",
    "jfif",
    "png",
    "webp",
    "avif",
    "apng",
    "gif",
    "bmp",
    "dib",
    "tif",
    "tiff",
    "jp2",
    "j2k",
    "jpx",
    "ppm",
    "pgm",
    "pbm",
    "pnm",
    "tga",
    "qoi",
    "ico",
)
ALLOWED_FORMATS = (
    "JPEG",  # also yields MPO (multi-picture JPEG)
    "PNG",
    "WEBP",
    "AVIF",
    "GIF",
    "BMP",
    "DIB",
    "TIFF",
    "JPEG2000",
    "PPM",
    "TGA",
    "QOI",
    "ICO",
)
Image.init()
_FORMATS = tuple(f for f in ALLOWED_FORMATS if f in Image.OPEN)  # those this PIL build has
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that swap width and height


class DecodeError(ValueError):
    """An image that cannot be decoded; the message says why."""


def pick_image_member(members: Mapping[str, bytes]) -> tuple[str, bytes]:
    """The image member of a sample as `(ext, data)`, chosen by extension.

    Extensions are compared case-insensitively by their last dot part; among several,
    a plain extension beats a compound one ("jpg" before "seg.png"), then the order of
    `IMAGE_EXTENSIONS`, then the name. Raises ValueError naming the members when none is
    an image.
    """
    candidates = []
    for ext in members:
        last = ext.lower().rsplit(".", 1)[-1]
        if last in IMAGE_EXTENSIONS:
            candidates.append(("." in ext, IMAGE_EXTENSIONS.index(last), ext))
    if not candidates:
        names = ", ".join(sorted(members)) or "none"
        raise ValueError(f"no image member (members: {names})")
    ext = min(candidates)[2]
    return ext, members[ext]


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode `data` into an RGB image (EXIF-transposed, first frame); raises DecodeError."""
    return decode_scaled(data, max_pixels)[0]


def decode_scaled(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, min_size: tuple[int, int] | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """As `decode_image`, but a JPEG may be decoded at a reduced scale (libjpeg's DCT
    scaling: 1/2, 1/4 or 1/8) as long as both sides stay at least `min_size` (H, W) after
    the EXIF transpose. Returns the image and the full size `(width, height)` after the
    EXIF transpose (what masks are made at)."""
    if not data:
        raise DecodeError("empty image data (0 bytes)")
    with _pil_guards(max_pixels):
        image = _open(data, max_pixels)
        width, height = image.size
        if width * height > max_pixels:
            raise DecodeError(_over_limit(width * height, max_pixels))
        orientation = _orientation(image)
        swap = orientation in _TRANSPOSING_ORIENTATIONS
        if min_size is not None:  # a no-op for formats other than JPEG
            h, w = min_size
            image.draft(None, (h, w) if swap else (w, h))
        try:
            image.load()
        except Image.DecompressionBombError as e:
            raise DecodeError(_over_limit("too many", max_pixels)) from e
        except Exception as e:
            raise DecodeError(f"truncated or corrupt image data ({image.format}): {e}") from e
    try:
        if orientation != 1:  # exif_transpose copies even an upright image
            image = ImageOps.exif_transpose(image)
    except Exception:
        swap = False  # unreadable EXIF: the pixels are fine, keep the stored orientation
    try:
        image = to_rgb(image)
    except Exception as e:
        raise DecodeError(f"cannot convert mode {image.mode} to RGB: {e}") from e
    return image, ((height, width) if swap else (width, height))


def _orientation(image: Image.Image) -> int:
    try:
        return image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:
        return 1  # unreadable EXIF: the stored orientation is kept


def probe_device_jpeg(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[int, int, int] | None:
    """`(width, height, orientation)` (the size after the EXIF transpose) of a JPEG that
    `decode_jpegs` may decode on a device: a single baseline JPEG (not progressive, not
    multi-picture), YCbCr/RGB or grayscale, within `max_pixels`, ending in an EOI marker
    (truncated files stay with PIL, which names them). Reads the header only; None for
    anything else, which the CPU decodes."""
    if not data.endswith(b"\xff\xd9"):
        return None
    try:
        with _pil_guards(max_pixels):
            image = _open(data, max_pixels)
    except DecodeError:
        return None
    width, height = image.size
    if (
        image.format != "JPEG"
        or image.mode not in ("RGB", "L")
        or "progressive" in image.info
        or width * height > max_pixels
    ):
        return None
    orientation = _orientation(image)
    if orientation in _TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    return width, height, orientation


def _jpeg_reason(error: RuntimeError) -> str:
    """The reason in torchvision's decode error: the last clause of its first line (on a
    GPU the message goes on with a C++ stack trace)."""
    lines = str(error).strip().splitlines()
    return lines[0].split(", ")[-1] if lines else type(error).__name__


def decode_jpegs(
    data: list[bytes], orientations: list[int], device: "torch.device"
) -> list["torch.Tensor | str"]:
    """JPEGs (those `probe_device_jpeg` accepts) decoded on `device` with
    `torchvision.io.decode_jpeg` (nvjpeg on a GPU, libjpeg-turbo on the CPU: the same
    pixels as PIL there), all in one call: `[H, W, 3]` uint8 in their EXIF orientation
    (contiguous: the CPU resize kernel's fast layout), or for an image that fails, the
    error message. On a GPU the current stream is drained
    first: nvJPEG's hardware engine writes its output without waiting for the stream, so
    it could overwrite memory that queued kernels still read (pytorch/vision#9606); the
    caller keeps other threads' device work out meanwhile."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]
    try:
        images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:  # one bad image fails the batch: decode one at a time
        images = []
        for one in encoded:
            try:
                images.append(decode_jpeg(one, mode=ImageReadMode.RGB, device=device))
            except RuntimeError as e:
                images.append(f"truncated or corrupt image data (JPEG): {_jpeg_reason(e)}")
    return [
        image
        if isinstance(image, str)
        else exif_orient(image.permute(1, 2, 0), orientation).contiguous()
        for image, orientation in zip(images, orientations, strict=True)
    ]


def exif_orient(pixels: "torch.Tensor", orientation: int) -> "torch.Tensor":
    """`[H, W, C]` pixels as displayed under EXIF `orientation` (PIL's
    `ImageOps.exif_transpose`); values other than 2-8 leave them as stored."""
    if orientation in (5, 7):  # transpose, transverse: mirrored along a diagonal
        pixels = pixels.transpose(0, 1)
        return pixels if orientation == 5 else pixels.flip(0, 1)
    turns = {3: 2, 6: 3, 8: 1}  # counter-clockwise quarter turns
    if orientation in turns:
        return pixels.rot90(turns[orientation], dims=(0, 1))
    flips = {2: (1,), 4: (0,)}  # mirrored left-right, top-bottom
    return pixels.flip(flips[orientation]) if orientation in flips else pixels


# PIL's guards are process globals; decodes may run in several threads (concurrent actor
# calls), so the decodes under way share one setting: the largest of their limits (each
# decode also checks its own exactly) until the last one restores what was there before.
_GUARDS_LOCK = threading.Lock()
_guarded: Counter = Counter()  # max_pixels of the decodes under way
_saved_guards: tuple = ()
# PIL warns above its limit; the exact check is ours (a DecodeError), so the warning is noise
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


@contextlib.contextmanager
def _pil_guards(max_pixels: int):
    """For this decode, PIL's bomb check uses our limit (it raises above twice the limit)
    and truncated data fails whoever enabled LOAD_TRUNCATED_IMAGES; restored afterwards."""
    global _saved_guards
    with _GUARDS_LOCK:
        if not _guarded:
            _saved_guards = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
        _guarded[max_pixels] += 1
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = max(_guarded), False
    try:
        yield
    finally:
        with _GUARDS_LOCK:
            _guarded[max_pixels] -= 1
            if not _guarded[max_pixels]:
                del _guarded[max_pixels]
            if _guarded:
                Image.MAX_IMAGE_PIXELS = max(_guarded)
            else:
                Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = _saved_guards


def _open(data: bytes, max_pixels: int) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data), formats=_FORMATS)
    except Image.DecompressionBombError as e:
        found = re.search(r"\((\d+) pixels\)", str(e))
        raise DecodeError(_over_limit(int(found[1]) if found else "too many", max_pixels)) from e
    except UnidentifiedImageError as e:
        raise DecodeError(
            f"cannot identify image file ({len(data)} bytes, starting {data[:8]!r})"
        ) from e
    except Exception as e:
        raise DecodeError(f"cannot read image header: {type(e).__name__}: {e}") from e


def _over_limit(pixels: int | str, max_pixels: int) -> str:
    return f"image has {pixels} pixels, over the limit of {max_pixels} (decompression bomb guard)"


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a loaded image of any mode to RGB by the rules in the module docstring."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode == "I":
        values = np.clip(np.asarray(image).astype(np.float64), 0, 65535)
        return _gray(np.rint(values * (255 / 65535)))
    if mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64))
        if values.size and values.min() >= 0 and values.max() <= 1:
            values = values * 255
        return _gray(np.rint(np.clip(values, 0, 255)))
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    elif mode in _ALPHA_MODES:
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image).convert("RGB")
    return image.convert("RGB")


def _gray(values: np.ndarray) -> Image.Image:
    return Image.fromarray(values.astype(np.uint8)).convert("RGB")


def _resize(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """`image` at `size` (H, W) by `gem.resize_uint8`, as uint8 `[H, W, 3]`."""
    import torch

    import gem

    return gem.resize_uint8(torch.from_numpy(np.array(image)), size).numpy()


def decode_batch(
    batch: dict[str, np.ndarray],
    image_size: tuple[int, int],
    max_pixels: int = DEFAULT_MAX_PIXELS,
    resize_to_model_input: bool = True,
    leave_jpegs_to_actor: bool = False,
) -> dict[str, np.ndarray]:
    """Ray Data batch (`shard`, `key`, `image`, `image_ext`, `error`, ...) -> the same rows
    with `width`, `height` (original size after EXIF transpose, 0 on error) and `pixels`
    (uint8 `[N, H, W, 3]` at `image_size` (H, W), by `gem.resize_uint8`; zeros on error);
    `image` and `image_ext` are dropped. With `resize_to_model_input` False, `pixels` holds
    each image as decoded (its own size, or a DCT-reduced one no smaller than `image_size`;
    a ragged column; `[1, 1, 3]` zeros on error) for the labeling actor to resize on its
    device. With `leave_jpegs_to_actor` (and `resize_to_model_input` False), the JPEGs
    `probe_device_jpeg` accepts are not decoded here: their bytes go on in a `jpeg` column
    (None for the other rows), with their EXIF `orientation`, for the actor to decode on its
    device (`decode_jpegs`). A row with an incoming error passes untouched; a decode failure
    sets `error` to "decode: <message>". Never raises for a bad sample."""
    h, w = image_size
    n = len(batch["key"])
    # Ray hands an all-null column over as float NaN: only a non-empty str is an error
    errors = np.array([e if isinstance(e, str) and e else None for e in batch["error"]], object)
    widths = np.zeros(n, dtype=np.int64)
    heights = np.zeros(n, dtype=np.int64)
    encoded = np.full(n, None, dtype=object)
    orientations = np.ones(n, dtype=np.int64)
    if resize_to_model_input:
        pixels = np.zeros((n, h, w, 3), dtype=np.uint8)
    else:
        pixels = np.empty(n, dtype=object)
        pixels[:] = [np.zeros((1, 1, 3), np.uint8)] * n
    for i in range(n):
        if errors[i] is not None:
            continue
        data = batch["image"][i]
        try:
            if not isinstance(data, bytes | bytearray | memoryview):
                raise DecodeError("no image data")
            data = bytes(data)
            probed = probe_device_jpeg(data, max_pixels) if leave_jpegs_to_actor else None
            if probed is not None:
                widths[i], heights[i], orientations[i] = probed
                encoded[i] = data
                continue
            image, (widths[i], heights[i]) = decode_scaled(data, max_pixels, (h, w))
            if resize_to_model_input:
                pixels[i] = _resize(image, (h, w))
            else:
                pixels[i] = np.asarray(image)
        except Exception as e:
            message = str(e) if isinstance(e, DecodeError) else f"{type(e).__name__}: {e}"
            errors[i] = f"decode: {message}"
            widths[i] = heights[i] = 0
    out = {k: v for k, v in batch.items() if k not in ("image", "image_ext")}
    out.update(error=errors, width=widths, height=heights, pixels=pixels)
    if leave_jpegs_to_actor:
        out.update(jpeg=encoded, orientation=orientations)
    return out
