"""`write_gallery(out, dest)`: a static, offline HTML gallery of an output's masks.

Each image of the output (status ok) is shown with all its masks overlaid in distinct
colours, and beside it the label names and scores in the same colours. Pixels come from
the source shards (`sources`, else the manifest's inputs). Pages of `per_page` images:
`index.html`, `page-2.html`, ... with links between them; images are embedded as data
URIs, so the pages need nothing else and no network.
"""

import base64
import colorsys
import html
import io
import os

import numpy as np
import pyarrow.compute as pc
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.decode import decode_image, pick_image_member
from pipeline.labeled_shards import iter_samples
from pipeline.output import IMAGES_DIR, MASKS_DIR, read_manifest
from pipeline.read import expand_inputs
from pipeline.report import COLORS
from pipeline.tables import match_sources, read_table

STYLE = """body{font-family:sans-serif;margin:16px;background:#fafafa}
.item{display:inline-block;vertical-align:top;margin:6px;padding:6px;background:#fff;
border:1px solid #ddd;width:280px}.item img{width:100%;image-rendering:pixelated}
.key{font-size:11px;color:#666;word-break:break-all}.label{font-size:13px;margin:2px 0}
.sw{display:inline-block;width:11px;height:11px;margin-right:5px;vertical-align:middle}
nav{margin:10px 0}nav a,nav b{margin-right:8px}"""


def palette(n: int) -> list[tuple[int, int, int]]:
    """`n` distinct colours: the report's, then evenly spaced hues."""
    extra = [
        tuple(int(255 * c) for c in colorsys.hsv_to_rgb((i * 0.618) % 1, 0.85, 0.95))
        for i in range(max(0, n - len(COLORS)))
    ]
    return [*COLORS, *extra][:n]


def overlay(image: Image.Image, masks: list[dict], colors, alpha: float = 0.55) -> str:
    """`image` with each mask (COCO RLE) blended in its colour, as a PNG data URI."""
    pixels = np.asarray(image, dtype=np.float32).copy()
    for rle, color in zip(masks, colors, strict=True):
        mask = mask_utils.decode(dict(rle, counts=rle["counts"].encode())).astype(bool)
        pixels[mask] = (1 - alpha) * pixels[mask] + alpha * np.array(color, np.float32)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _sources(out: str, sources: list[str] | None, shards: list[str]) -> dict[str, str]:
    if sources is None:
        sources = (read_manifest(out) or {}).get("inputs") or []
    return match_sources(shards, expand_inputs(sources)) if sources else {}


def _nav(page: int, pages: int) -> str:
    links = [
        f"<b>{p}</b>" if p == page else f'<a href="{_page_name(p)}">{p}</a>'
        for p in range(1, pages + 1)
    ]
    return f"<nav>page {' '.join(links)}</nav>"


def _page_name(page: int) -> str:
    return "index.html" if page == 1 else f"page-{page}.html"


def write_gallery(
    out: str, dest: str, sources: list[str] | None = None, per_page: int = 60
) -> list[str]:
    """Write the gallery pages of `out` into the local directory `dest`; return their paths."""
    images = read_table(out, IMAGES_DIR, ["shard", "key", "width", "height", "status"])
    images = images.filter(pc.equal(images["status"], "ok")).sort_by(
        [("shard", "ascending"), ("key", "ascending")]
    )
    masks = read_table(out, MASKS_DIR, ["shard", "key", "label", "score", "mask", "area"])
    by_image: dict[tuple[str, str], list[dict]] = {}
    for row in masks.sort_by([("score", "descending")]).to_pylist():
        by_image.setdefault((row["shard"], row["key"]), []).append(row)
    rows = images.to_pylist()
    where = _sources(out, sources, sorted({r["shard"] for r in rows}))
    pictures: dict[tuple[str, str], Image.Image] = {}
    problems = []
    for shard in sorted({r["shard"] for r in rows}):
        try:
            for key, members in iter_samples(where.get(shard, shard)):
                pictures[(shard, key)] = decode_image(pick_image_member(dict(members))[1])
        except Exception as err:  # noqa: BLE001 - an unreadable source only loses pixels
            problems.append(f"{where.get(shard, shard)}: {type(err).__name__}: {err}")
    os.makedirs(dest, exist_ok=True)
    pages = max(1, -(-len(rows) // per_page))
    paths = []
    for page in range(1, pages + 1):
        items = [
            _item(r, by_image.get((r["shard"], r["key"]), []), pictures)
            for r in rows[(page - 1) * per_page : page * per_page]
        ]
        notes = "".join(f"<p>missing pixels: {html.escape(p)}</p>" for p in problems)
        body = (
            f"<h1>gemlabel gallery: {html.escape(out)}</h1><p>{len(rows)} images, "
            f"{len(masks)} masks</p>{notes}{_nav(page, pages)}{''.join(items)}"
            f"{_nav(page, pages)}"
        )
        path = os.path.join(dest, _page_name(page))
        with open(path, "w") as f:
            f.write(
                f'<!doctype html><html><head><meta charset="utf-8"><title>gemlabel '
                f"gallery {page}/{pages}</title><style>{STYLE}</style></head>"
                f"<body>{body}</body></html>"
            )
        paths.append(path)
    return paths


def _item(row: dict, masks: list[dict], pictures: dict) -> str:
    image = pictures.get((row["shard"], row["key"]))
    colors = palette(len(masks))
    picture = (
        f'<img src="{overlay(image, [m["mask"] for m in masks], colors)}" alt="">'
        if image is not None
        else "<p>(no pixels: source not readable)</p>"
    )
    labels = "".join(
        f'<div class="label"><span class="sw" style="background:rgb{c}"></span>'
        f"{html.escape(m['label'])} {m['score']:.2f}"
        f"{' (empty)' if m['area'] == 0 else ''}</div>"
        for m, c in zip(masks, colors, strict=True)
    )
    key = html.escape(f"{row['key']} ({row['width']}x{row['height']})")
    return f'<div class="item">{picture}<div class="key">{key}</div>{labels}</div>'
