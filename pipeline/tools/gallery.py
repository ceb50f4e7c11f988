"""`write_gallery(out, dest)`: a static, offline HTML gallery of an output's masks.

Each image of the output (status ok) is shown with all its masks drawn as
pipeline.tools.draw draws them (a light tint inside an outline, the label on the image, a
colour per mask picked against the pixels under it), and beside it the label names and
scores in the same colours. Pixels come from
the source shards (`sources`, else the manifest's inputs), shard by shard in tar order.
Pages of `per_page` images: `index.html`, `page-2.html`, ... with links between them;
pictures (560 px on the longer side: smaller images are enlarged, so their labels are
legible) are embedded as data URIs, so the pages need nothing else and no network.
"""

import base64
import html
import io

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from pipeline.stages.decode import decode_scaled, pick_image_member
from pipeline.stages.read import expand_inputs
from pipeline.storage.output import IMAGES_DIR, MASKS_DIR, read_manifest
from pipeline.storage.store import Store, as_store
from pipeline.storage.tables import decode_mask, match_sources, read_table, table_dataset
from pipeline.tools.draw import PALETTE, draw_masks, pick_colors
from pipeline.tools.labeled_shards import iter_samples

STYLE = """body{font-family:sans-serif;margin:16px;background:#fafafa}
.item{display:inline-block;vertical-align:top;margin:6px;padding:6px;background:#fff;
border:1px solid #ddd;width:280px}.item img{width:100%}
.key{font-size:11px;color:#666;word-break:break-all}.label{font-size:13px;margin:2px 0}
.sw{display:inline-block;width:11px;height:11px;margin-right:5px;vertical-align:middle}
nav{margin:10px 0}nav a,nav b{margin-right:8px}"""
SIDE = 560  # longest side of a picture: twice its 280 px box, for high-density screens


def overlay(
    data: bytes, width: int, height: int, masks: list[dict], labels: list[str], side: int
) -> tuple[str, list[tuple[int, int, int]]]:
    """The image in `data` (whose masks are `width` x `height`) at `side` pixels on its
    longer side with its masks (COCO RLE) drawn and labeled (pipeline.tools.draw), as a
    PNG data URI, and the masks' colours."""
    scale = side / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    image, full = decode_scaled(data, min_size=size[::-1])
    if full != (width, height):
        raise ValueError(f"the source image is {full[0]}x{full[1]}, its masks {width}x{height}")
    image = image.convert("RGB").resize(size, Image.BILINEAR if scale < 1 else Image.NEAREST)
    binary = [
        np.asarray(Image.fromarray(decode_mask(rle).view(np.uint8)).resize(size, Image.NEAREST)) > 0
        for rle in masks
    ]
    colors = pick_colors(np.asarray(image), binary)
    buffer = io.BytesIO()
    draw_masks(image, binary, labels, colors).save(buffer, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    return uri, colors


def _sources(out: Store | str, sources: list[str] | None, shards: list[str]) -> dict[str, str]:
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
    out: Store | str,
    dest: Store | str,
    sources: list[str] | None = None,
    per_page: int = 60,
    side: int = SIDE,
) -> list[str]:
    """Write the gallery pages of `out` into the directory `dest`; return their paths (URLs).

    Streams: shard by shard (sorted), samples in tar order, one shard's masks and one
    page of pictures in memory, so outputs of any size fit; pictures are at most `side`
    pixels on their longer side."""
    out = as_store(out)
    dest = as_store(dest)
    images = read_table(out, IMAGES_DIR, ["shard", "key", "width", "height", "status"])
    # every shard of the tables: the inputs also name shards without an ok image
    where = _sources(out, sources, sorted(set(images["shard"].to_pylist())))
    images = images.filter(pc.equal(images["status"], "ok")).sort_by("shard")
    by_shard = _by_shard(images)
    masks_table = table_dataset(out, MASKS_DIR)  # listed once, queried per shard
    header = f"<h1>gemlabel gallery: {html.escape(out.display())}</h1>"
    header += f"<p>{images.num_rows} images, {masks_table.count_rows()} masks</p>"
    pages = _Pages(dest, header, -(-images.num_rows // per_page), per_page)
    for shard, (start, stop) in by_shard.items():
        rows = {r["key"]: r for r in images.slice(start, stop - start).to_pylist()}
        masks: dict[str, list[dict]] = {}
        table = masks_table.to_table(
            columns=["key", "label", "score", "mask", "area"], filter=pc.field("shard") == shard
        )
        for m in table.sort_by([("score", "descending")]).to_pylist():
            masks.setdefault(m["key"], []).append(m)
        source = where.get(shard, shard)
        try:
            for key, members in iter_samples(source):
                if key in rows:
                    pages.add(_item(rows.pop(key), masks.get(key, []), members, side))
                    if not rows:  # the rest of the shard has nothing to show
                        break
        except Exception as err:  # noqa: BLE001 - an unreadable source only loses pixels
            pages.note(f"missing pixels: {source}: {type(err).__name__}: {err}")
        for row in rows.values():  # not in the source
            pages.add(_item(row, masks.get(row["key"], []), None, side))
    return pages.close()


def _by_shard(images: pa.Table) -> dict[str, tuple[int, int]]:
    """Each shard's row range `(start, stop)` in `images`, sorted by shard."""
    names = images["shard"].to_numpy(zero_copy_only=False)
    if not len(names):
        return {}
    bounds = [0, *(np.flatnonzero(names[1:] != names[:-1]) + 1).tolist(), len(names)]
    return {names[a]: (a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)}


class _Pages:
    """Pages of `per_page` items written as they fill; notes go on the page being filled."""

    def __init__(self, dest: Store | str, header: str, count: int, per_page: int):
        self.dest, self.header, self.count, self.per_page = dest, header, count, per_page
        self.items: list[str] = []
        self.notes: list[str] = []
        self.paths: list[str] = []

    def note(self, text: str) -> None:
        self.notes.append(f"<p>{html.escape(text)}</p>")

    def add(self, item: str) -> None:
        self.items.append(item)
        if len(self.items) == self.per_page:
            self._write()

    def close(self) -> list[str]:
        if self.items or self.notes or not self.paths:
            self._write()
        return self.paths

    def _write(self) -> None:
        page = len(self.paths) + 1
        pages = max(self.count, page)
        nav = _nav(page, pages)
        body = f"{self.header}{''.join(self.notes)}{nav}{''.join(self.items)}{nav}"
        self.dest.write_text(
            _page_name(page),
            (
                f'<!doctype html><html><head><meta charset="utf-8"><title>gemlabel '
                f"gallery {page}/{pages}</title><style>{STYLE}</style></head>"
                f"<body>{body}</body></html>"
            ),
        )
        self.paths.append(self.dest.display(_page_name(page)))
        self.items, self.notes = [], []


def _item(row: dict, masks: list[dict], members: list | None, side: int) -> str:
    colors = [PALETTE[i % len(PALETTE)] for i in range(len(masks))]
    if members is None:
        picture = "<p>(no pixels: not read from the source)</p>"
    else:
        try:
            data = pick_image_member(dict(members))[1]
            labels = [f"{m['label']} {m['score']:.2f}" for m in masks]
            uri, colors = overlay(
                data, row["width"], row["height"], [m["mask"] for m in masks], labels, side
            )
            picture = f'<img src="{uri}" alt="">'
        except Exception as err:  # noqa: BLE001 - one unreadable picture only loses its pixels
            picture = f"<p>(no pixels: {html.escape(f'{type(err).__name__}: {err}')})</p>"
    labels = "".join(
        f'<div class="label"><span class="sw" style="background:rgb{c}"></span>'
        f"{html.escape(m['label'])} {m['score']:.2f}"
        f"{' (empty)' if m['area'] == 0 else ''}</div>"
        for m, c in zip(masks, colors, strict=True)
    )
    key = html.escape(f"{row['key']} ({row['width']}x{row['height']})")
    return f'<div class="item">{picture}<div class="key">{key}</div>{labels}</div>'
