"""Test data: real WebDataset shards (tar files) with real images, good and bad.

    from tests.shards import write_good_shards, write_bad_corpus

`write_bad_corpus` returns the expected outcome of every sample as an `Expect`:
`stage` is "ok" or the error stage ("read", "decode"), `message` a substring of the error
message (after the "<stage>: " prefix), `size` the (width, height) expected after decoding.
"""

import io
import pathlib
import pickle
import struct
import tarfile
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

Sample = tuple[str, dict[str, bytes]]

DEFAULT_SIZES = ((96, 64), (64, 96), (320, 240), (33, 57), (512, 384), (1, 1))
PAYLOAD_FILE = "PAYLOAD_EXECUTED"


class Expect(NamedTuple):
    """The expected outcome of one sample."""

    stage: str  # "ok", "read" or "decode"
    message: str = ""  # substring of the error message ("" = any message)
    size: tuple[int, int] | None = None  # (width, height) when ok


def write_shard(path: str | Path, samples: list[Sample]) -> str:
    """Write a WebDataset tar: members `<key>.<ext>`, grouped by key, in the given order."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                info.mtime = 0
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def rgb_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A seeded RGB picture with structure: a colour gradient and a few filled shapes."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    c0, c1 = rng.integers(0, 256, size=(2, 3))
    t = (xs / max(width - 1, 1) + ys / max(height - 1, 1))[..., None] / 2
    pixels = (c0 * (1 - t) + c1 * t).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x0, x1 = sorted(rng.integers(0, width, size=2).tolist())
        y0, y1 = sorted(rng.integers(0, height, size=2).tolist())
        fill = tuple(rng.integers(0, 256, size=3).tolist())
        if rng.random() < 0.5:
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.ellipse((x0, y0, x1, y1), fill=fill)
    return image


def image_bytes(
    width: int,
    height: int,
    fmt: str = "jpeg",
    mode: str = "RGB",
    seed: int = 0,
    exif_orientation: int | None = None,
) -> bytes:
    """Encode a seeded picture as `fmt` in `mode` (RGB, L, P, RGBA, LA, CMYK, I;16, ...).

    `width`/`height` are the stored size; with `exif_orientation` 5-8 a viewer shows it
    transposed."""
    image = rgb_image(width, height, seed)
    if mode == "I;16":
        gray = np.asarray(image.convert("L"), dtype=np.uint16) * 257
        image = Image.frombytes("I;16", (width, height), gray.astype("<u2").tobytes())
    elif mode == "P":
        image = image.quantize(colors=16)
    elif mode != "RGB":
        image = image.convert(mode)
    out = io.BytesIO()
    kwargs = {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif.tobytes()
    image.save(out, format=fmt.upper(), **kwargs)
    return out.getvalue()


def animated_gif_bytes(width: int, height: int, colors: list[tuple[int, int, int]]) -> bytes:
    """An animated GIF with one solid-colour frame per entry of `colors`."""
    frames = [Image.new("RGB", (width, height), c) for c in colors]
    out = io.BytesIO()
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    return out.getvalue()


def bomb_png_bytes(width: int = 20000, height: int = 20000) -> bytes:
    """A valid 1-bit grayscale PNG of `width` x `height` black pixels, small on disk (a
    decompression bomb: hundreds of MB once decoded to RGB)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    row = bytes(1 + (width + 7) // 8)  # filter byte 0 + packed bits
    comp = zlib.compressobj(9)
    rows_per_chunk = 256
    idat = []
    for start in range(0, height, rows_per_chunk):
        idat.append(comp.compress(row * min(rows_per_chunk, height - start)))
    idat.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", b"".join(idat))
        + chunk(b"IEND", b"")
    )


class _Payload:
    """Unpickling this creates `path`: proof that untrusted pickle data was executed."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def corrupt_huffman_jpeg() -> bytes:
    """A JPEG whose header parses and which ends in EOI, with a broken Huffman table."""
    data = image_bytes(160, 120, "jpeg", seed=1)
    at = data.index(b"\xff\xc4")  # DHT
    return data[: at + 5] + b"\xff" * 16 + data[at + 21 :]


def pickle_payload(path: str | Path) -> bytes:
    """Pickle bytes that create the file `path` when unpickled."""
    return pickle.dumps(_Payload(str(path)), protocol=4)


def payload_path(directory: str | Path) -> Path:
    """The file that `write_bad_corpus(directory)`'s pickle payloads create if executed."""
    return Path(directory) / PAYLOAD_FILE


def _meta(key: str) -> dict[str, bytes]:
    return {"json": f'{{"key": "{key}"}}'.encode(), "txt": f"caption {key}".encode()}


def write_good_shards(
    directory: str | Path,
    n_shards: int,
    per_shard: int,
    sizes: tuple[tuple[int, int], ...] = DEFAULT_SIZES,
    formats: tuple[str, ...] = ("jpg", "png", "webp"),
) -> list[str]:
    """`n_shards` shards `shard-%06d.tar` of `per_shard` valid images each, cycling through
    `sizes` (width, height) and `formats`; keys are `%06d` of the global sample index (so
    they are unique across shards), each sample also has `.json` and `.txt` members."""
    return [write_good_shard(directory, s, per_shard, sizes, formats) for s in range(n_shards)]


def write_good_shard(
    directory: str | Path,
    index: int,
    per_shard: int,
    sizes: tuple[tuple[int, int], ...] = DEFAULT_SIZES,
    formats: tuple[str, ...] = ("jpg", "png", "webp"),
) -> str:
    """Shard number `index` of `write_good_shards` (so shards can be written in parallel)."""
    samples = []
    for i in range(per_shard):
        n = index * per_shard + i
        width, height = sizes[n % len(sizes)]
        ext = formats[n % len(formats)]
        fmt = "jpeg" if ext == "jpg" else ext
        key = f"{n:06d}"
        members = {ext: image_bytes(width, height, fmt, seed=n), **_meta(key)}
        samples.append((key, members))
    return write_shard(Path(directory) / f"shard-{index:06d}.tar", samples)


def write_bad_corpus(
    directory: str | Path,
) -> tuple[list[str], dict[tuple[str, str], Expect]]:
    """Shards with every kind of bad input, good samples mixed in.

    Returns `(shard_paths, expected)`: the inputs for a job (the last is a path that does not
    exist) and the `Expect` of every sample keyed by `(shard, key)`. For the missing shard
    the key is "" (the reader reports the shard itself). In the truncated tar the first
    two samples are complete and the third is cut inside its image member (reported under
    its key).
    Pickle payloads create `payload_path(directory)` if anything unpickles them.
    """
    directory = Path(directory)
    payload = pickle_payload(payload_path(directory))
    good_jpeg = image_bytes(160, 120, "jpeg", seed=1)
    cases: list[tuple[str, dict[str, bytes], Expect]] = [
        ("good_jpg", {"jpg": good_jpeg}, Expect("ok", size=(160, 120))),
        (
            "truncated_jpg",
            {"jpg": good_jpeg[: len(good_jpeg) * 3 // 4]},
            Expect("decode", "truncated"),
        ),
        ("zero_bytes", {"jpg": b""}, Expect("decode", "empty")),
        (
            "not_an_image",
            {"png": b"this is not an image\n" * 10},
            Expect("decode", "cannot identify"),
        ),
        ("bomb", {"png": bomb_png_bytes()}, Expect("decode", "decompression bomb")),
        ("cmyk", {"jpg": image_bytes(40, 30, "jpeg", "CMYK", seed=2)}, Expect("ok", size=(40, 30))),
        ("png16", {"png": image_bytes(40, 30, "png", "I;16", seed=3)}, Expect("ok", size=(40, 30))),
        ("gray", {"png": image_bytes(40, 30, "png", "L", seed=4)}, Expect("ok", size=(40, 30))),
        ("palette", {"png": image_bytes(40, 30, "png", "P", seed=5)}, Expect("ok", size=(40, 30))),
        ("rgba", {"png": image_bytes(40, 30, "png", "RGBA", seed=6)}, Expect("ok", size=(40, 30))),
        (
            "exif_rot6",
            {"jpg": image_bytes(64, 32, "jpeg", seed=7, exif_orientation=6)},
            Expect("ok", size=(32, 64)),
        ),
        (
            "exif_rot8",
            {"jpeg": image_bytes(50, 20, "jpeg", seed=8, exif_orientation=8)},
            Expect("ok", size=(20, 50)),
        ),
        (
            "animated_gif",
            {"gif": animated_gif_bytes(24, 16, [(255, 0, 0), (0, 0, 255)])},
            Expect("ok", size=(24, 16)),
        ),
        ("no_image", _meta("no_image"), Expect("read", "no image member")),
        (
            "pickles_and_image",
            {"png": image_bytes(30, 20, "png", seed=9), "pyd": payload, "pickle": payload},
            Expect("ok", size=(30, 20)),
        ),
        ("only_pickles", {"pyd": payload, "pickle": payload}, Expect("read", "no image member")),
        ("good_webp", {"webp": image_bytes(70, 50, "webp", seed=10)}, Expect("ok", size=(70, 50))),
    ]
    main = write_shard(directory / "bad-000000.tar", [(k, m) for k, m, _ in cases])
    expected: dict[tuple[str, str], Expect] = {(main, k): e for k, _, e in cases}

    cut_samples = [(f"cut{i}", {"jpg": image_bytes(64, 48, seed=20 + i)}) for i in range(3)]
    cut = write_shard(directory / "truncated-000001.tar", cut_samples)
    data = Path(cut).read_bytes()
    last_member = data.rfind(b"cut2.jpg")  # its header; the data follows 512 bytes later
    Path(cut).write_bytes(data[: last_member + 512 + 100])
    expected[(cut, "cut0")] = Expect("ok", size=(64, 48))
    expected[(cut, "cut1")] = Expect("ok", size=(64, 48))
    expected[(cut, "cut2")] = Expect("read", "truncated or corrupt")

    missing = str(directory / "missing-000002.tar")
    expected[(missing, "")] = Expect("read", "cannot open shard")
    return [main, cut, missing], expected
