"""Labeled WebDataset shards: the source samples joined with their rows in the tables.

`write_labeled_shards(out, dest, ...)` joins an output directory's tables to the source
shards by (shard, key) and writes new shards to `dest`; each sample carries its original
members unchanged plus

- `<key>.labels.json`: `status` ("ok" or "error"), `error`, `width`, `height`, `shard` (the
  table's shard URL), `source` (where it was read), `orientation` (ok samples: the EXIF
  orientation applied to the stored image, see below) and `annotations`, best score first:
  `label_id`, `label`, `score`, `bbox` [x, y, w, h], `area`, `segmentation` (COCO RLE:
  `size` [h, w], `counts`);
- `<key>.seg.png` (ok samples only): the semantic map at the original resolution. Pixel
  value 0 is background and `label_id + 1` a class (ids are rows of the vocabulary). Where
  masks overlap (`--mask-mode threshold`), the pixel takes the class with the highest
  score (ties: the lower id). 8-bit grayscale when the vocabulary has at most 255 classes,
  else 16-bit. `dest/manifest.json` holds this id map (`id_map`) with the class names.

Members of those two names in a source sample are replaced.

Images are stored oriented as labeled: the masks, the PNG, `width` and `height` are at the
image's size after its EXIF orientation, so an image member whose EXIF orientation is not 1
is re-encoded once, transposed, in its own format (a JPEG with its own quantization tables
and chroma subsampling; the rest of its EXIF and its ICC profile kept, the orientation tag
removed), and any decoder, with or without `exif_transpose`, sees the pixels the masks were
made on. Every other member, and every image already upright (orientation 1 or none), keeps
its bytes. `labels.json` records the orientation applied (`orientation`: 1 when none); an
image that cannot be re-encoded keeps its bytes and its `orientation` 1 (the loader applies
EXIF orientation either way), counted in the shard's stats as `unoriented`.

Which samples: ok samples with at least one kept class, always; ok samples without
classes with `include_unlabeled`; error samples (`status` "error", no PNG) with
`include_errors`. Every sample is counted either way (manifest `totals`), and a sample
selected but not found in its source shard is counted as `missing`. Shard-level errors
(key "": a shard that could not be read) have no sample to copy and are counted as errors.

Shards: by default one output shard per source shard that has selected samples, holding
them in source order; with `samples_per_shard`, the selected samples (source shard order,
then key order) are cut into shards of that many. Output shards are named
`<prefix>-%06d.tar`, numbered without gaps.

Exactly once and resumable: each output shard is one Ray task that streams its source
tars into a tar that appears whole or not at all (`Store.open_write`: spooled, then one
upload on object stores; a temp file moved into place elsewhere), writing its stats
(`_shards/<name>.json`) before the tar appears; a rerun skips shards whose tar exists.
Every sample is assigned to exactly one output shard by a deterministic plan, and bytes
are deterministic (mtime 0). The plan is counts, not keys (ranges of each source shard's
selected samples in key order, and the files holding them), so the driver's memory does
not grow with the samples.
"""

import io
import json
import logging
import posixpath
import tarfile
from collections import Counter
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import ExifTags, Image, ImageOps
from PIL.JpegImagePlugin import get_sampling

from pipeline.ray_session import ray_session
from pipeline.stages.decode import pick_image_member
from pipeline.stages.read import expand_inputs, group_samples, tar_members
from pipeline.storage import output
from pipeline.storage.lock import OutputLock
from pipeline.storage.output import IMAGES_DIR, MASKS_DIR, SHARDS_DIR
from pipeline.storage.store import Store, as_store
from pipeline.storage.tables import decode_mask, match_sources, table_dataset
from pipeline.tools.classes import class_names, vocabulary_size

LABELS_MEMBER = "labels.json"
SEG_MEMBER = "seg.png"
BACKGROUND = 0


def sample_kind(status: str, labels: int) -> str:
    """ "labeled", "unlabeled" or "errors" for an images row with `labels` classes."""
    return "errors" if status != "ok" else ("labeled" if labels else "unlabeled")


def selected(kind: str, key: str, include_unlabeled: bool, include_errors: bool) -> bool:
    """Whether a sample of `kind` is written (see the module docstring)."""
    if kind == "errors":
        return include_errors and key != ""
    return kind == "labeled" or include_unlabeled


def iter_samples(url: str | Store) -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    """`(key, [(ext, bytes), ...])` per sample of a WebDataset tar, in tar order, grouped
    as the run reads it (pipeline.stages.read.group_samples: meta members skipped; a key's
    members that reappear after other keys are ignored). Exceptions of a damaged tar
    propagate after the complete samples before the damage. `url`: a shard URL, or a Store
    of one (a labeled shard)."""
    store = url if isinstance(url, Store) else Store(url)
    with store.open_read(store.root) as stream:
        yield from group_samples(tar_members(stream))


def png_dtype(classes: int) -> type:
    """uint8 when ids 0..classes fit 8 bits, else uint16."""
    if classes > 65535:
        raise ValueError(f"a {classes}-class vocabulary does not fit a 16-bit PNG")
    return np.uint8 if classes <= 255 else np.uint16


def semantic_map(annotations: list[dict], height: int, width: int, dtype) -> np.ndarray:
    """The `[height, width]` id map of `annotations` (see the module docstring)."""
    seg = np.zeros((height, width), dtype=dtype)
    for ann in sorted(annotations, key=lambda a: (a["score"], -a["label_id"])):
        seg[decode_mask(ann["segmentation"])] = ann["label_id"] + 1
    return seg


def encode_png(seg: np.ndarray) -> bytes:
    """Lossless grayscale PNG of an id map (8- or 16-bit by dtype)."""
    image = Image.fromarray(seg)  # uint8 -> L, uint16 -> I;16
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """The id map of a `seg.png` member (uint8 or uint16)."""
    image = Image.open(io.BytesIO(data))
    return np.asarray(image).astype(np.uint16 if image.mode.startswith("I") else np.uint8)


def upright(data: bytes, size: tuple[int, int] | None = None) -> tuple[bytes, int]:
    """`(bytes, orientation applied)` of an image member: `data` itself with 1 when its EXIF
    orientation is 1, absent or unreadable; else the image transposed by it and re-encoded in
    its format (see the module docstring), with that orientation. `size` (width, height):
    the size the image was labeled at; a re-encoded image of another size is not used.
    Raises when the image cannot be re-encoded."""
    with Image.open(io.BytesIO(data)) as image:
        try:
            orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
        except Exception:  # noqa: BLE001 - unreadable EXIF: the labeler kept the stored pixels
            return data, 1
        if orientation not in range(2, 9):
            return data, 1
        fmt = image.format
        options = {"icc_profile": image.info.get("icc_profile")}
        if fmt == "JPEG":  # the same quantization and subsampling: one more, minimal, loss
            options.update(qtables=image.quantization, subsampling=get_sampling(image))
            options.update(progressive="progressive" in image.info)
        elif fmt == "WEBP":
            options.update(quality=95)
        turned = ImageOps.exif_transpose(image)  # its info["exif"]: the tag removed
    if size is not None and turned.size != tuple(size):
        raise ValueError(f"oriented size {turned.size} is not the labeled size {tuple(size)}")
    if turned.info.get("exif"):
        options["exif"] = turned.info["exif"]
    buffer = io.BytesIO()
    turned.save(buffer, format=fmt, **{k: v for k, v in options.items() if v is not None})
    return buffer.getvalue(), orientation


def oriented_members(
    members: list[tuple[str, bytes]], size: tuple[int, int] | None
) -> tuple[list[tuple[str, bytes]], int, bool]:
    """A sample's members with its image member upright (`upright`), the orientation
    applied, and whether re-encoding failed (the bytes then kept)."""
    try:
        ext, data = pick_image_member(dict(members))
    except ValueError:
        return members, 1, False
    try:
        turned, orientation = upright(data, size)
    except Exception as err:  # noqa: BLE001 - kept as read; the loader applies EXIF itself
        logging.getLogger(__name__).warning("image kept with its EXIF orientation: %s", err)
        return members, 1, True
    if orientation == 1:
        return members, 1, False
    return [(e, turned if e == ext else d) for e, d in members], orientation, False


def _label_members(
    row: dict, masks: list[dict], source: str, dtype, orientation: int | None = None
) -> dict[str, bytes]:
    by_id = {m["label_id"]: m for m in masks}
    annotations = [
        {
            "label_id": int(label),
            "label": by_id[label]["label"],
            "score": float(by_id[label]["score"]),
            "bbox": [float(v) for v in by_id[label]["bbox"]],
            "area": int(by_id[label]["area"]),
            "segmentation": by_id[label]["mask"],
        }
        for label in row["labels"]
        if label in by_id
    ]
    info = {
        "key": row["key"],
        "shard": row["shard"],
        "source": source,
        "status": row["status"],
        "error": row["error"],
        "width": row["width"],
        "height": row["height"],
        "annotations": annotations,
    }
    if orientation is not None:  # ok samples: the EXIF orientation applied to the image
        info["orientation"] = orientation
    members = {LABELS_MEMBER: json.dumps(info, sort_keys=True).encode()}
    if row["status"] == "ok" and row["width"] and row["height"]:
        seg = semantic_map(annotations, row["height"], row["width"], dtype)
        members[SEG_MEMBER] = encode_png(seg)
    return members


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def _picked(
    out: Store, job: dict, include_unlabeled: bool, include_errors: bool
) -> tuple[list[tuple[str, str, list[dict]]], dict]:
    """Per part of `job`: (table shard, source URL, its images rows in key order), and the
    mask rows of those samples by (shard, key). Reads only the files the plan names."""
    parts, files = json.loads(job["parts"]), json.loads(job["files"])
    shards = sorted({shard for shard, _, _, _ in parts})
    table = table_dataset(out, IMAGES_DIR, files["images"]).to_table(
        filter=pc.field("shard").isin(shards)
    )
    by_shard: dict[str, list[dict]] = {}
    for row in table.to_pylist():
        kind = sample_kind(row["status"], len(row["labels"]))
        if selected(kind, row["key"], include_unlabeled, include_errors):
            by_shard.setdefault(row["shard"], []).append(row)
    picked = []
    for shard, source, start, stop in parts:
        rows = sorted(by_shard.get(shard, []), key=lambda r: r["key"])[start:stop]
        picked.append((shard, source, rows))
    keys = [row["key"] for _, _, rows in picked for row in rows]
    where = pc.field("shard").isin(shards) & pc.field("key").isin(keys)
    masks: dict[tuple[str, str], list[dict]] = {}
    for m in table_dataset(out, MASKS_DIR, files["masks"]).to_table(filter=where).to_pylist():
        masks.setdefault((m["shard"], m["key"]), []).append(m)
    return picked, masks


def write_labeled_shard(
    job: dict,
    out: Store,
    dest: Store,
    classes: int,
    include_unlabeled: bool,
    include_errors: bool,
) -> dict:
    """One output shard (a Ray Data row: `name`; `parts` as JSON [[table shard, source URL,
    first, stop], ...], ranges of each shard's selected samples in key order; `files` as
    JSON, the images and masks files that hold them) -> its stats row. Skips (and
    reports) a shard already written."""
    name = job["name"]
    stats_path = posixpath.join(SHARDS_DIR, f"{name}.json")
    if dest.exists(name):
        return {"name": name, "stats": dest.read(stats_path).decode(), "skipped": True}
    picked, masks = _picked(out, job, include_unlabeled, include_errors)
    dtype = png_dtype(classes)
    stats = {"name": name, "samples": 0, "labeled": 0, "unlabeled": 0, "errors": 0}
    stats.update(missing=0, damage=[], sources=[source for _, source, _ in picked])
    stats.update(reoriented=0, unoriented=0)
    # the stats first, then the tar: a tar in place means its stats are there
    with (
        dest.open_write(name) as f,
        tarfile.open(fileobj=f, mode="w|", format=tarfile.PAX_FORMAT) as tar,
    ):
        for shard, source, rows in picked:
            wanted, found = {row["key"]: row for row in rows}, set()
            try:
                for key, members in iter_samples(source):
                    if key not in wanted:
                        continue
                    row = wanted[key]
                    orientation = None
                    if row["status"] == "ok":
                        size = (row["width"], row["height"])
                        members, orientation, failed = oriented_members(members, size)
                        stats["reoriented"] += orientation != 1
                        stats["unoriented"] += failed
                    found_masks = masks.get((shard, key), [])
                    labels = _label_members(row, found_masks, source, dtype, orientation)
                    for ext, data in members:
                        if ext not in labels:
                            _add(tar, f"{key}.{ext}", data)
                    for ext, data in labels.items():
                        _add(tar, f"{key}.{ext}", data)
                    found.add(key)
                    stats[sample_kind(row["status"], len(row["labels"]))] += 1
                    stats["samples"] += 1
                    if len(found) == len(wanted):
                        break
            except Exception as err:  # noqa: BLE001 - a damaged source is counted, not fatal
                stats["damage"].append(f"{source}: {type(err).__name__}: {err}")
            stats["missing"] += len(wanted) - len(found)
        text = json.dumps(stats, sort_keys=True)
        dest.write_text(stats_path, text)
    return {"name": name, "stats": text, "skipped": False}


# an images row's kind as a code: what the plan counts per file without Python rows
_KIND_CODES = {"labeled": 0, "unlabeled": 1, "errors": 2}
_SHARD_ERROR = 3  # an error row of a whole shard (key ""): counted, never written


def _file_kinds(store: Store, path: str) -> Counter:
    """(shard, kind code) -> rows, of one images file."""
    table = store.read_table(path, ["shard", "key", "status", "labels"])
    ok = pc.equal(table["status"], "ok").to_numpy(zero_copy_only=False)
    lengths = pc.fill_null(pc.list_value_length(table["labels"]), 0).to_numpy()
    whole_shard = pc.equal(table["key"], "").to_numpy(zero_copy_only=False)
    labeled, unlabeled, errors = (_KIND_CODES[k] for k in ("labeled", "unlabeled", "errors"))
    codes = np.where(
        ok,
        np.where(lengths > 0, labeled, unlabeled),  # sample_kind's rule, one code per row
        np.where(whole_shard, _SHARD_ERROR, errors),
    )
    groups = (
        pa.table({"shard": table["shard"], "code": codes})
        .group_by(["shard", "code"])
        .aggregate([("code", "count")])
    )
    pairs = zip(groups["shard"].to_pylist(), groups["code"].to_pylist(), strict=True)
    return Counter(dict(zip(pairs, groups["code_count"].to_pylist(), strict=True)))


def _selection(
    kinds: dict[str, Counter], shards: list[str], wanted: set[str]
) -> tuple[dict, list[tuple[str, int]]]:
    """The counts of every sample by kind (and `<kind>_selected`) over `shards`, and each
    shard with selected samples and how many."""
    counts = {k: 0 for k in _KIND_CODES}
    counts.update({f"{k}_selected": 0 for k in _KIND_CODES})
    chosen: list[tuple[str, int]] = []  # (shard, selected samples)
    for shard in shards:
        for kind, code in _KIND_CODES.items():
            rows = kinds[shard][code] + (kinds[shard][_SHARD_ERROR] if kind == "errors" else 0)
            counts[kind] += rows
            counts[f"{kind}_selected"] += kinds[shard][code] if code in wanted else 0
        if picked := sum(kinds[shard][code] for code in wanted):
            chosen.append((shard, picked))
    return counts, chosen


def _group_samples(
    chosen: list[tuple[str, int]], samples_per_shard: int | None
) -> list[list[tuple[str, int, int]]]:
    """The output shards as (shard, first, stop) ranges of the selected samples: one per
    source shard, or runs of `samples_per_shard` selected samples, in order, across them."""
    if not samples_per_shard:
        return [[(shard, 0, n)] for shard, n in chosen]
    groups, group, room = [], [], samples_per_shard
    for shard, n in chosen:
        start = 0
        while start < n:
            stop = min(n, start + room)
            group.append((shard, start, stop))
            room -= stop - start
            start = stop
            if not room:
                groups.append(group)
                group, room = [], samples_per_shard
    if group:
        groups.append(group)
    return groups


def plan_shards(
    out: Store | str,
    sources: list[str] | None,
    include_unlabeled: bool = False,
    include_errors: bool = False,
    samples_per_shard: int | None = None,
    prefix: str = "shard",
) -> tuple[list[dict], dict]:
    """The output shards (rows for `write_labeled_shard`) and the counts of every sample by
    kind (`labeled`, `unlabeled`, `errors`, each with `_selected`) over the chosen shards.

    The plan holds counts, not keys: each images file is counted on its own, so the
    driver's memory grows with shards and files, not with samples.

    Raises ValueError when a chosen shard is not completely labeled in `out`."""
    out = as_store(out)
    images, masks = output.table_files(out)
    masks = {posixpath.basename(p) for p in masks}
    kinds: dict[str, Counter] = {}
    holding: dict[str, dict[str, None]] = {}  # shard -> its images files, in order
    per_file = output.per_file(images, lambda p: _file_kinds(out, p))
    for path, counts in zip(images, per_file, strict=True):
        for (shard, code), n in counts.items():
            kinds.setdefault(shard, Counter())[code] += n
            holding.setdefault(shard, {})[posixpath.basename(path)] = None
    table_shards = sorted(kinds)
    mapping = match_sources(table_shards, sources) if sources else {s: s for s in table_shards}
    state = output.scan(out)
    incomplete = [s for s in mapping if not state.complete(s)]
    if incomplete:
        raise ValueError(
            f"{len(incomplete)} shard(s) are not completely labeled in {out.display()} (e.g. "
            f"{incomplete[0]}); finish the run first (rerun gemlabel run to resume)"
        )
    wanted = {  # the kinds written (of samples: a key other than "")
        code
        for kind, code in _KIND_CODES.items()
        if selected(kind, "sample", include_unlabeled, include_errors)
    }
    counts, chosen = _selection(kinds, list(mapping), wanted)
    groups = _group_samples(chosen, samples_per_shard)
    jobs = []
    for i, group in enumerate(groups):
        files = list(dict.fromkeys(f for shard, _, _ in group for f in holding[shard]))
        jobs.append(
            {
                "name": f"{prefix}-{i:06d}.tar",
                "parts": json.dumps([[s, mapping[s], first, stop] for s, first, stop in group]),
                "files": json.dumps({"images": files, "masks": [f for f in files if f in masks]}),
            }
        )
    return jobs, counts


def _prepare(dest: Store | str, settings: dict, overwrite: bool) -> None:
    old = output.read_manifest(dest)
    if old is not None and old.get("settings") != settings and not overwrite:
        diffs = "\n  ".join(output.config_differences(old.get("settings", {}), settings))
        raise output.ConfigMismatchError(
            f"{dest.display()} holds labeled shards made with other settings:\n  {diffs}\n"
            "Use another --out, or pass --overwrite to delete them and start over."
        )
    if overwrite:
        dest.delete([p for p in dest.ls("") if p.endswith(".tar")])
        for name in (SHARDS_DIR, output.MANIFEST):
            dest.delete_tree(name)
    dest.delete(dest.find_temp())  # of an interrupted run: nobody else writes here


def _first_manifest(settings: dict, classes: int, names: dict[int, str]) -> dict:
    """The manifest of labeled shards before they are written: settings, members, id map."""
    return {
        "settings": settings,
        "members": {"labels": LABELS_MEMBER, "seg": SEG_MEMBER},
        "id_map": {
            "background": BACKGROUND,
            "value": "label_id + 1",
            "bits": 8 if png_dtype(classes) is np.uint8 else 16,
            "classes": classes,
            "names": {str(i + 1): name for i, name in sorted(names.items())},
        },
        "status": "incomplete",
    }


def _results(results: list[dict], planned: int, counts: dict) -> dict:
    """The manifest's status, shards and totals from the writers' result rows."""
    shards = {r["name"]: json.loads(r["stats"]) for r in sorted(results, key=lambda r: r["name"])}
    kinds = ("samples", "labeled", "unlabeled", "errors", "missing")
    written = {k: sum(s[k] for s in shards.values()) for k in kinds}
    return {
        "status": "complete" if len(shards) == planned else "incomplete",
        "shards": shards,
        "totals": {"tables": counts, "written": written, "shards": len(shards)},
        "skipped_shards": sum(bool(r["skipped"]) for r in results),
    }


def _write_on_ray(jobs: list[dict], options: dict) -> list[dict]:
    """`write_labeled_shard` of every job, as Ray Data tasks; their result rows."""
    import ray

    if not jobs:
        return []
    ds = ray.data.from_items(jobs, override_num_blocks=len(jobs))
    return list(ds.map(write_labeled_shard, fn_kwargs=options).iter_rows())


def write_labeled_shards(
    out: Store | str,
    dest: Store | str,
    sources: list[str] | None = None,
    samples_per_shard: int | None = None,
    include_unlabeled: bool = False,
    include_errors: bool = False,
    prefix: str = "shard",
    overwrite: bool = False,
    address: str | None = None,
    num_cpus: int | None = None,
) -> dict:
    """Write the labeled shards of `out` to `dest` (see the module docstring); return the
    manifest written to `dest/manifest.json`."""
    out = as_store(out)
    dest = as_store(dest)
    if output.read_manifest(out) is None:
        raise ValueError(f"{out.display()} is not a gemlabel output (no manifest.json)")
    expanded = expand_inputs(sources) if sources else None
    jobs, counts = plan_shards(
        out, expanded, include_unlabeled, include_errors, samples_per_shard, prefix
    )
    classes = vocabulary_size(out)
    names = class_names(out)
    settings = {
        "source_output": out.display(),
        "sources": expanded,
        "samples_per_shard": samples_per_shard,
        "include_unlabeled": include_unlabeled,
        "include_errors": include_errors,
        "prefix": prefix,
    }
    with OutputLock(dest):  # one writer at a time, as for runs
        _prepare(dest, settings, overwrite)
        manifest = _first_manifest(settings, classes, names)
        output.write_manifest(dest, manifest)

        options = {
            "out": out,
            "dest": dest,
            "classes": classes,
            "include_unlabeled": include_unlabeled,
            "include_errors": include_errors,
        }
        with ray_session(address, num_cpus):
            results = _write_on_ray(jobs, options)
        manifest.update(_results(results, len(jobs), counts))
        output.write_manifest(dest, manifest)
        return manifest
