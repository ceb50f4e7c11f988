"""Seeded synthetic scenes: 1-4 coloured shapes on varied backgrounds, exact masks.

Each scene is a function of `(seed, index)` only. Classes are "<colour> <shape>" (6 x 4 =
24 of them; shapes upright, placed to overlap little); the label map holds the class id of
every pixel (-1: background), drawn with the same polygons as the image, so it is exact.
Shards are WebDataset tars: `<key>.png` (or `<key>.jpg` stored rotated with an EXIF
orientation tag, which decoding must undo) and `<key>.json` with the ground truth
(`caption`, `width`, `height`, and one `segments` entry per visible class: `label_id`,
`label`, `area`, `mask` as COCO RLE of the displayed image).

    python -m gem.toy.scenes OUT_DIR --count 64 --per-shard 32 --min-size 64 --max-size 160
"""

import argparse
import colorsys
import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

COLOURS = {"red": 0.0, "yellow": 0.15, "green": 0.33, "cyan": 0.5, "blue": 0.62, "purple": 0.8}
SHAPES = ("circle", "square", "triangle", "cross")
CLASSES = [f"{colour} {shape}" for shape in SHAPES for colour in COLOURS]
BACKGROUND = "background"
BACKGROUNDS = ("flat", "gradient", "noise", "stripes", "checker")
# Shapes stand upright, turned by at most +-0.2 rad, so a toy ViT can tell them apart by
# their edges (freely rotated, it learned colour fast and shape barely).
_UPRIGHT = {"square": 0.0, "triangle": -math.pi / 2, "cross": 0.0, "star": -math.pi / 2}


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(h % 1.0, s, v))


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A low-saturation backdrop (flat, gradient, noise, stripes or checker), uint8 [H, W, 3]."""
    c0, c1 = (
        np.array(_hsv(rng.random(), rng.uniform(0, 0.25), rng.uniform(0.2, 0.95)), float)
        for _ in range(2)
    )
    ys, xs = np.mgrid[0:height, 0:width].astype(float)
    kind = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    if kind == "flat":
        t = np.zeros((height, width))
    elif kind == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        t = xs * math.cos(angle) + ys * math.sin(angle)
        t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    elif kind == "noise":
        t = rng.random((height, width))
    elif kind == "stripes":
        period = rng.uniform(6, 20)
        angle = rng.uniform(0, math.pi)
        t = (np.sin((xs * math.cos(angle) + ys * math.sin(angle)) * 2 * math.pi / period) > 0) * 1.0
    else:
        cell = int(rng.integers(6, 20))
        t = ((xs // cell + ys // cell) % 2) * 1.0
    pixels = c0 * (1 - t[..., None]) + c1 * t[..., None]
    pixels += rng.normal(0, rng.uniform(0, 8), pixels.shape)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple]:
    """Vertices of `shape` (not circle) centred at (cx, cy) with outer radius r."""
    if shape == "square":
        pts = [(r * math.cos(a), r * math.sin(a)) for a in np.arange(4) * math.pi / 2 + math.pi / 4]
    elif shape == "triangle":
        pts = [(r * math.cos(a), r * math.sin(a)) for a in np.arange(3) * 2 * math.pi / 3]
    elif shape == "star":
        pts = [
            (
                (r if i % 2 == 0 else 0.45 * r) * math.cos(i * math.pi / 5),
                (r if i % 2 == 0 else 0.45 * r) * math.sin(i * math.pi / 5),
            )
            for i in range(10)
        ]
    else:  # cross: a plus sign with arms of width 0.55 r
        a, b = r, 0.28 * r
        pts = [
            (b, a),
            (b, b),
            (a, b),
            (a, -b),
            (b, -b),
            (b, -a),
            (-b, -a),
            (-b, -b),
            (-a, -b),
            (-a, b),
            (-b, b),
            (-b, a),
        ]
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def render_scene(
    seed: int, index: int, width: int, height: int, max_objects: int = 4
) -> tuple[Image.Image, np.ndarray, str]:
    """Scene `(seed, index)` at `width` x `height`: RGB image, label map int16 [H, W]
    (class id, -1 background) and a caption naming the visible objects."""
    rng = np.random.default_rng([seed, index])
    image = Image.fromarray(_background(rng, width, height))
    labels = Image.new("I", (width, height), -1)
    draw, label_draw = ImageDraw.Draw(image), ImageDraw.Draw(labels)
    side = min(width, height)
    placed: list[tuple[float, float, float]] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        class_id = int(rng.integers(len(CLASSES)))
        colour, shape = CLASSES[class_id].split(" ")
        fill = _hsv(
            COLOURS[colour] + rng.uniform(-0.02, 0.02), rng.uniform(0.75, 1), rng.uniform(0.7, 1)
        )
        r = side * rng.uniform(0.18, 0.32)
        for _ in range(20):  # a spot overlapping the earlier shapes little, if one is found
            cx, cy = rng.uniform(r * 0.6, width - r * 0.6), rng.uniform(r * 0.6, height - r * 0.6)
            if all(math.hypot(cx - x, cy - y) >= 0.8 * (r + q) for x, y, q in placed):
                break
        placed.append((cx, cy, r))
        if shape == "circle":
            box = [cx - r, cy - r, cx + r, cy + r]
            draw.ellipse(box, fill=fill)
            label_draw.ellipse(box, fill=class_id)
        else:
            pts = _polygon(shape, cx, cy, r, _UPRIGHT[shape] + rng.uniform(-0.2, 0.2))
            draw.polygon(pts, fill=fill)
            label_draw.polygon(pts, fill=class_id)
    label_map = np.asarray(labels, dtype=np.int16)
    present = [CLASSES[c] for c in np.unique(label_map) if c >= 0]
    caption = "a photo of " + " and ".join(f"a {name}" for name in present) + "."
    return image, label_map, caption


def ground_truth(label_map: np.ndarray, caption: str) -> dict:
    """The JSON ground truth of a label map: one RLE segment per visible class."""
    height, width = label_map.shape
    segments = []
    for class_id in np.unique(label_map):
        if class_id < 0:
            continue
        rle = mask_utils.encode(np.asfortranarray((label_map == class_id).astype(np.uint8)))
        segments.append(
            {
                "label_id": int(class_id),
                "label": CLASSES[class_id],
                "area": int(mask_utils.area(rle)),
                "mask": {"size": [height, width], "counts": rle["counts"].decode()},
            }
        )
    return {"width": width, "height": height, "caption": caption, "segments": segments}


def label_map_from_json(truth: dict) -> np.ndarray:
    """The label map int16 [H, W] (-1 background) back from a ground-truth JSON dict."""
    label_map = np.full((truth["height"], truth["width"]), -1, dtype=np.int16)
    for seg in truth["segments"]:
        rle = {"size": seg["mask"]["size"], "counts": seg["mask"]["counts"].encode()}
        label_map[mask_utils.decode(rle).astype(bool)] = seg["label_id"]
    return label_map


def _exif_jpeg(image: Image.Image, orientation: int) -> bytes:
    """JPEG bytes whose stored pixels are `image` rotated so that EXIF `orientation` (6
    or 8) displays `image` again."""
    stored = image.transpose(Image.ROTATE_90 if orientation == 6 else Image.ROTATE_270)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


def scene_sample(
    seed: int, index: int, min_size: int, max_size: int, exif_fraction: float = 0.0
) -> tuple[str, dict[str, bytes]]:
    """One WebDataset sample `(key, {ext: bytes})` of scene `(seed, index)`, its width
    and height drawn in [min_size, max_size] (so possibly non-square)."""
    rng = np.random.default_rng([seed, index, 1])
    width, height = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
    image, label_map, caption = render_scene(seed, index, width, height)
    members = {}
    if rng.random() < exif_fraction:
        members["jpg"] = _exif_jpeg(image, int(rng.choice([6, 8])))
    else:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        members["png"] = buffer.getvalue()
    members["json"] = json.dumps(ground_truth(label_map, caption)).encode()
    return f"scene-{seed}-{index:07d}", members


def write_scene_shards(
    out_dir: str | Path,
    count: int,
    per_shard: int = 256,
    seed: int = 0,
    min_size: int = 64,
    max_size: int = 128,
    exif_fraction: float = 0.0,
    start: int = 0,
) -> list[str]:
    """Write scenes `start..start+count-1` as `shard-NNNNNN.tar` files; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard, first in enumerate(range(start, start + count, per_shard)):
        path = out_dir / f"shard-{shard:06d}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for index in range(first, min(first + per_shard, start + count)):
                key, members = scene_sample(seed, index, min_size, max_size, exif_fraction)
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    tar.addfile(info, io.BytesIO(data))
        paths.append(str(path))
    return paths


def write_vocab(path: str | Path) -> str:
    """The class names, one per line (a `--vocab` file for `gemlabel run`)."""
    Path(path).write_text("\n".join(CLASSES) + "\n")
    return str(path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="output directory for shard-NNNNNN.tar and vocab.txt")
    p.add_argument("--count", type=int, default=64)
    p.add_argument("--per-shard", type=int, default=32)
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--min-size", type=int, default=64)
    p.add_argument("--max-size", type=int, default=160)
    p.add_argument("--exif-fraction", type=float, default=0.25)
    args = p.parse_args(argv)
    paths = write_scene_shards(
        args.out,
        args.count,
        args.per_shard,
        args.seed,
        args.min_size,
        args.max_size,
        args.exif_fraction,
    )
    write_vocab(Path(args.out) / "vocab.txt")
    print(f"wrote {args.count} scenes in {len(paths)} shards and vocab.txt to {args.out}")


if __name__ == "__main__":
    main()
