"""`write_report(out, path)`: a self-contained HTML report on an output's labels.

What a person checks before training on pseudo-labels, from the tables: images ok/error
by error kind, masks per image, class frequency (top classes and the long tail), score and
mask-area histograms; with readable source shards, example overlays per top class. Plots
are inline SVG, overlays embedded JPEGs (data URIs): the file needs nothing else, no
network. Each plot is a `<figure id="...">` (ids in `FIGURES`).
"""

import base64
import html
import io
import math
from collections import Counter

import numpy as np
import pyarrow.compute as pc
from PIL import Image

from pipeline.errors import error_kind, shorten
from pipeline.stages.decode import decode_image, pick_image_member
from pipeline.stages.read import expand_inputs
from pipeline.storage.output import IMAGES_DIR, MASKS_DIR, read_manifest
from pipeline.storage.store import Store, as_store, split_file
from pipeline.storage.tables import decode_mask, match_sources, read_table
from pipeline.tools.classes import vocabulary_size
from pipeline.tools.draw import draw_masks, pick_colors
from pipeline.tools.labeled_shards import iter_samples
from pipeline.weights import bundled_models

FIGURES = (
    "status",
    "errors",
    "masks-per-image",
    "top-classes",
    "long-tail",
    "scores",
    "mask-area",
)
THUMB = 320  # longer side of an example overlay, in pixels (small images are enlarged)
BAR = "#4472c4"


def _text(
    x: float, y: float, text: str, anchor: str = "middle", size: int = 11, title: str = ""
) -> str:
    hover = f"<title>{html.escape(title)}</title>" if title else ""
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}">'
        f"{hover}{html.escape(str(text))}</text>"
    )


def nice_ticks(lo: float, hi: float, most: int = 8) -> list[float]:
    """Round tick values in [lo, hi]: the multiples of the smallest step of the 1-2-5
    series (..., 0.1, 0.2, 0.5, 1, 2, 5, 10, ...) that gives at most `most` + 1 ticks."""
    span = hi - lo
    if span <= 0:
        return [lo]
    power = 10.0 ** math.floor(math.log10(span / most))
    step = next(m * power for m in (1, 2, 5, 10) if span / (m * power) <= most + 1e-9)
    first = math.ceil(lo / step - 1e-9)
    return [round(k * step, 12) for k in range(first, math.floor(hi / step + 1e-9) + 1)]


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def vbars(
    labels: list[str],
    values: list[float],
    xlabel: str,
    log: bool = False,
    axis: tuple[float, float] | None = None,
) -> str:
    """A vertical bar chart as inline SVG (`log`: log10(1 + value) heights). Each bar's
    `labels` entry is its tooltip. The x axis: with `axis` (lo, hi), the bars are equal
    bins over that numeric range, ticked at round values; else each bar is one integer
    (its label), the round ones ticked. The y axis is ticked at round counts (powers of 10
    on a log scale)."""
    width, height, left, bottom = 640, 240, 56, 40
    plot_w, plot_h = width - left - 10, height - bottom - 15
    n = max(len(values), 1)
    step = plot_w / n
    top = max(values, default=0) or 1
    scale = (lambda v: math.log10(1 + v) / math.log10(1 + top)) if log else (lambda v: v / top)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">']
    if log:
        yticks = [0] + [10**e for e in range(int(math.log10(top)) + 1)]
    else:
        yticks = nice_ticks(0, top)
    for t in yticks:
        y = height - bottom - scale(t) * plot_h
        parts.append(_text(left - 4, y + 4, _number(t), "end"))
    for i, (label, value) in enumerate(zip(labels, values, strict=True)):
        h = scale(value) * plot_h
        x = left + i * step
        parts.append(
            f'<rect x="{x + 1:.1f}" y="{height - bottom - h:.1f}" width="{max(step - 2, 1):.1f}"'
            f' height="{h:.1f}" fill="{BAR}"><title>{html.escape(str(label))}: {value:g}</title>'
            "</rect>"
        )
    if axis is not None:
        lo, hi = axis
        ticks = [(left + (t - lo) / ((hi - lo) or 1) * plot_w, t) for t in nice_ticks(lo, hi)]
    else:
        numbers = [int(label) for label in labels]
        shown = set(nice_ticks(min(numbers), max(numbers))) if numbers else set()
        ticks = [(left + (i + 0.5) * step, v) for i, v in enumerate(numbers) if v in shown]
    for x, t in ticks:
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{height - bottom}" ')
        parts[-1] += f'y2="{height - bottom + 3}" stroke="#666"/>'
        parts.append(_text(x, height - bottom + 14, _number(t), size=10))
    parts.append(_text(left + plot_w / 2, height - 6, xlabel))
    parts.append("</svg>")
    return "".join(parts)


def hbars(labels: list[str], values: list[float], left: int = 160) -> str:
    """A horizontal bar chart (one labeled row per value, `left` px for labels: a longer
    label is shortened, its full text the tooltip of label and bar) as inline SVG."""
    row, width = 18, 640
    height = row * len(values) + 10
    top = max(values, default=0) or 1
    chars = (left - 10) // 7  # 11 px sans-serif: under 7 px a character on average
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">']
    for i, (label, value) in enumerate(zip(labels, values, strict=True)):
        w = value / top * (width - left - 60)
        y = 5 + i * row
        parts.append(_text(left - 6, y + 12, shorten(label, chars), "end", title=label))
        parts.append(
            f'<rect x="{left}" y="{y + 2}" width="{w:.1f}" height="{row - 4}" fill="{BAR}">'
            f"<title>{html.escape(label)}: {value:g}</title></rect>"
        )
        parts.append(_text(left + w + 4, y + 12, f"{value:g}", "start"))
    parts.append("</svg>")
    return "".join(parts)


def histogram(values: np.ndarray, bins: int, upper: float) -> tuple[list[str], list[int]]:
    """Counts of `values` in `bins` equal bins over [0, upper], labeled by their ranges."""
    counts, edges = np.histogram(values, bins=bins, range=(0.0, upper or 1.0))
    labels = [f"{a:.3g}\u2013{b:.3g}" for a, b in zip(edges[:-1], edges[1:], strict=True)]
    return labels, counts.tolist()


def weights_text(manifest: dict) -> str:
    """The weights the run used: the manifest's record, else (older manifests) what its
    config implies."""
    recorded = (manifest.get("weights") or {}).get("text")
    if recorded:
        return recorded
    config = manifest.get("config", {})
    model, pretrained = config.get("model"), config.get("pretrained")
    if pretrained:
        path = "/" in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))
        return f"checkpoint {pretrained}" if path else f"open_clip {model} {pretrained}"
    if model in bundled_models():
        return f"bundled: {model}"
    return f"random, seed {config.get('seed', 0)}"


def _ids(table) -> list[tuple[str, str]]:
    return list(zip(table["shard"].to_pylist(), table["key"].to_pylist(), strict=True))


def collect(out: Store | str) -> dict:
    """The report's numbers from the tables of `out`."""
    out = as_store(out)
    images = read_table(out, IMAGES_DIR, ["shard", "key", "width", "height", "status", "error"])
    masks = read_table(out, MASKS_DIR, ["shard", "key", "label_id", "label", "score", "area"])
    status = images["status"].to_numpy(zero_copy_only=False)
    errors = Counter(error_kind(e) for e in images["error"].drop_null().to_pylist())
    ok = images.filter(pc.equal(images["status"], "ok"))
    per_image = Counter(_ids(masks))
    counts = [per_image.get(k, 0) for k in _ids(ok)]
    w, h = (pc.fill_null(ok[c], 0).to_numpy() for c in ("width", "height"))
    sizes = dict(zip(_ids(ok), (w.astype(np.int64) * h).tolist(), strict=True))
    pixels = np.array([sizes.get(k, 0) for k in _ids(masks)], dtype=np.float64)
    area = masks["area"].to_numpy().astype(np.float64)
    fraction = np.divide(area, pixels, out=np.zeros_like(area), where=pixels > 0)
    classes = Counter(masks["label"].to_pylist())
    return {
        "images": len(status),
        "ok": int((status == "ok").sum()),
        "errors": errors,
        "masks_per_image": Counter(counts),
        "classes": classes,
        "vocabulary": vocabulary_size(out),
        "scores": masks["score"].to_numpy(),
        "area_fraction": fraction,
        "empty_masks": int((area == 0).sum()),
        "masks": masks,
    }


def _overlay(image: Image.Image, rle: dict, label: str) -> str:
    """The image at THUMB pixels on its longer side with the mask drawn and labeled
    (pipeline.tools.draw: outline, light tint, the label inside the picture), as a JPEG
    data URI."""
    mask = decode_mask(rle)
    if mask.shape != (image.height, image.width):
        raise ValueError(
            f"the source image is {image.width}x{image.height}, its mask "
            f"{mask.shape[1]}x{mask.shape[0]}"
        )
    scale = THUMB / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    picture = image.convert("RGB").resize(size, Image.BILINEAR if scale < 1 else Image.NEAREST)
    mask = np.asarray(Image.fromarray(mask.view(np.uint8)).resize(size, Image.NEAREST)) > 0
    color = pick_colors(np.asarray(picture), [mask])
    picture = draw_masks(picture, [mask], [label], color)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=88)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def examples(out: Store | str, stats: dict, sources: dict[str, str], classes: int, per_class: int):
    """Per top class (up to `classes`): up to `per_class` overlays of its highest-scoring
    non-empty masks as (caption, data URI); plus messages of sources that failed."""
    masks = stats["masks"]
    top = [name for name, _ in stats["classes"].most_common(classes)]
    ranked = masks.filter(pc.greater(masks["area"], 0)).sort_by([("score", "descending")])
    picks: dict[str, list[dict]] = {name: [] for name in top}
    for row in ranked.to_pylist():
        if row["label"] in picks and len(picks[row["label"]]) < per_class:
            picks[row["label"]].append(row)
    chosen = [row for rows in picks.values() for row in rows]
    where = pc.field("shard").isin({r["shard"] for r in chosen}) & pc.field("key").isin(
        {r["key"] for r in chosen}
    )
    geometry = {
        (r["shard"], r["key"], r["label_id"]): r
        for r in read_table(out, MASKS_DIR, ["shard", "key", "label_id", "mask"], where).to_pylist()
    }
    wanted: dict[str, set[str]] = {}
    for row in chosen:
        wanted.setdefault(row["shard"], set()).add(row["key"])
    pictures: dict[tuple[str, str], bytes] = {}  # encoded: decoded one at a time below
    problems = []
    for shard, keys in wanted.items():
        source = sources.get(shard, shard)
        try:
            for key, members in iter_samples(source):
                if key in keys:
                    pictures[(shard, key)] = pick_image_member(dict(members))[1]
                    if len(keys) == sum(k in keys for s, k in pictures if s == shard):
                        break
        except Exception as err:  # noqa: BLE001 - an unreadable source only loses examples
            problems.append(f"{source}: {type(err).__name__}: {err}")
    result = []
    for label in top:
        shown = []
        for row in picks[label]:
            data = pictures.get((row["shard"], row["key"]))
            if data is None:
                continue
            g = geometry[(row["shard"], row["key"], row["label_id"])]
            try:
                uri = _overlay(decode_image(data), g["mask"], label)
            except Exception as err:  # noqa: BLE001 - an unreadable picture only loses itself
                problems.append(f"{row['shard']} {row['key']}: {type(err).__name__}: {err}")
                continue
            shown.append((f"{row['key']} ({row['score']:.3f})", uri))
        result.append((label, shown))
    return result, problems


def _figure(fid: str, title: str, body: str, note: str = "") -> str:
    caption = html.escape(title) + (f" <small>{html.escape(note)}</small>" if note else "")
    return f'<figure id="{fid}"><figcaption>{caption}</figcaption>{body}</figure>'


def _empty_note(manifest: dict, in_table: int) -> str:
    """What became of empty masks: the run's count of those it did not write (below the
    threshold), and any area-0 rows an older gemlabel wrote."""
    dropped = (manifest.get("run") or {}).get("dropped_empty")
    notes = [] if dropped is None else [f"{dropped} empty masks not written (below threshold)"]
    if in_table:
        notes.append(f"{in_table} empty masks in the table")
    return "; ".join(notes)


def _count_figures(stats: dict, top: int) -> list[str]:
    """Images by status, errors by kind, masks per image, the top classes, the long tail."""
    errors = stats["errors"]
    figures = [
        _figure(
            "status",
            "Images by status",
            hbars(["ok", "error"], [stats["ok"], sum(errors.values())]),
            f"{stats['images']} images",
        ),
        _figure(
            "errors",
            "Errors by kind",
            hbars(*zip(*errors.most_common(15), strict=True), left=330)
            if errors
            else "<p>No errors.</p>",
        ),
    ]
    per_image = stats["masks_per_image"]
    upper = max(per_image, default=0)
    figures.append(
        _figure(
            "masks-per-image",
            "Masks per ok image",
            vbars(
                [str(i) for i in range(upper + 1)],
                [per_image.get(i, 0) for i in range(upper + 1)],
                "masks",
            ),
        )
    )
    classes = stats["classes"]
    common = classes.most_common(top)
    figures.append(
        _figure(
            "top-classes",
            f"Top {len(common)} classes (masks)",
            hbars([c for c, _ in common], [v for _, v in common]),
        )
    )
    ranked = [v for _, v in classes.most_common()]
    rare = sum(v < 5 for v in ranked)
    unseen = max(stats["vocabulary"] - len(classes), 0)
    figures.append(
        _figure(
            "long-tail",
            "Long tail: masks per class by rank (log scale)",
            vbars([str(i + 1) for i in range(len(ranked))], ranked, "class rank", log=True),
            f"{len(classes)} classes seen, {rare} with fewer than 5 masks, "
            f"{unseen} of {stats['vocabulary']} never",
        )
    )
    return figures


def _mask_figures(stats: dict, manifest: dict) -> list[str]:
    """The histograms of the masks' scores and areas."""
    scores = stats["scores"]
    upper = float(scores.max()) if len(scores) else 1.0
    labels, counts = histogram(scores, 20, upper)
    score_figure = _figure(
        "scores",
        "Mask scores (image-level)",
        vbars(labels, counts, "score", axis=(0.0, upper or 1.0)),
    )
    labels, counts = histogram(stats["area_fraction"], 20, 1.0)
    area_figure = _figure(
        "mask-area",
        "Mask area (fraction of the image)",
        vbars(labels, counts, "area / image area", axis=(0.0, 1.0)),
        _empty_note(manifest, stats["empty_masks"]),
    )
    return [score_figure, area_figure]


def _examples(overlays, problems) -> str:
    """The example overlays per top class, and the problems met drawing them."""
    if overlays is None:
        return "<p>No examples: pass the source shards (--source) to show overlays.</p>"
    rows = []
    for label, shown in overlays:
        cells = "".join(
            f'<div class="ex"><img src="{uri}" alt="{html.escape(label)}">'
            f"<div>{html.escape(caption)}</div></div>"
            for caption, uri in shown
        )
        rows.append(
            f'<div class="class-examples"><h3>{html.escape(label)}</h3>'
            f"{cells or '<p>no readable example</p>'}</div>"
        )
    return "".join(rows) + "".join(f"<p class=problem>{html.escape(p)}</p>" for p in problems)


def render(out: Store | str, stats: dict, overlays=None, problems=(), top: int = 20) -> str:
    """The report's HTML."""
    manifest = read_manifest(out) or {}
    n_errors = sum(stats["errors"].values())
    scores = stats["scores"]
    figures = _count_figures(stats, top) + _mask_figures(stats, manifest)
    gallery = _examples(overlays, problems)
    config = manifest.get("config", {})
    summary = (
        f"model {config.get('model')}, weights {weights_text(manifest)}, "
        f"method {config.get('method')}, top-k {config.get('top_k')}, "
        f"vocabulary {stats['vocabulary']} classes, status {manifest.get('status')}"
    )
    if "filter" in manifest:
        summary += f", filtered: {manifest['filter']}"
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>gemlabel report: {html.escape(out.display())}</title>
<style>
body {{ font-family: sans-serif; margin: 24px; color: #222; }}
figure {{ margin: 16px 0; }} figcaption {{ font-weight: bold; margin-bottom: 4px; }}
small {{ font-weight: normal; color: #555; }} text {{ fill: #333; }}
.ex {{ display: inline-block; margin: 4px; font-size: 12px; text-align: center; }}
.grid {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(660px, 1fr)); }}
</style></head><body>
<h1>gemlabel report</h1>
<p>{html.escape(out.display())}: {stats["images"]} images ({stats["ok"]} ok, {n_errors} error),
{len(scores)} masks. {html.escape(summary)}.</p>
<div class="grid">{"".join(figures)}</div>
<h2>Examples per top class</h2>
<div id="examples">{gallery}</div>
</body></html>
"""


def write_report(
    out: Store | str,
    path: str,
    sources: list[str] | None = None,
    top: int = 20,
    example_classes: int = 8,
    per_class: int = 3,
) -> dict:
    """Write the report of `out` to `path` (a local path or URL); return its numbers.

    Overlays need the source shards: `sources` (inputs as for `gemlabel run`, matched to
    the tables' shards by URL or file name)."""
    out = as_store(out)
    stats = collect(out)
    overlays, problems = None, []
    if sources:
        shards = read_table(out, IMAGES_DIR, ["shard"])["shard"].unique().to_pylist()
        mapping = match_sources(shards, expand_inputs(sources))
        overlays, problems = examples(out, stats, mapping, example_classes, per_class)
    store, name = split_file(path)
    store.write_text(name, render(out, stats, overlays, problems, top))
    return stats
