"""`export_coco(out, path)`: an output's masks as a COCO-format JSON file that COCO tools
open as is.

`images` (one per ok image: `id`, `file_name`, `width`, `height`, `shard`), `categories`
(the run's vocabulary: `id` = label_id + 1, as COCO ids start at 1) and `annotations` (one
per mask: `segmentation` as compressed COCO RLE, `area`, `bbox`, `iscrowd` 0, and the
label's `score`). Loads with `pycocotools.coco.COCO`.

`file_name` is the sample's key with the extension its image member has in the source shard
(`000123.jpg`), prefixed by the shard's name without its suffix (`shard-000001/000123.jpg`)
when a key occurs in several shards. Extensions come from the source shards (the tables'
shard URLs, or `sources` matched to them by URL or file name): their tar headers are read;
a shard that cannot be read leaves its images' `file_name` a bare key (counted as
`unresolved`). With `images_dir`, each image is
written there under that name, upright (its EXIF orientation applied, as the labeler saw it:
the size of its masks; an upright image keeps its bytes), and `file_name` is its path
relative to `images_root` (default: the JSON's directory), so that a COCO tool opening the
JSON finds the pictures beside it. `shard` is the shard as the user gave it to `gemlabel
run` (a literal path or URL among the manifest's inputs, brace ranges expanded), else the
shard URL of the tables.
"""

import io
import json
import os
import posixpath
from collections import Counter

import pyarrow.compute as pc
from braceexpand import braceexpand
from PIL import Image

from pipeline.stages.decode import decode_image, pick_image_member
from pipeline.stages.read import TAR_SUFFIXES, expand_inputs, tar_members
from pipeline.storage.output import IMAGES_DIR, MASKS_DIR, read_manifest
from pipeline.storage.store import Store, as_store, split_file
from pipeline.storage.tables import match_sources, read_table
from pipeline.tools.classes import class_names
from pipeline.tools.labeled_shards import iter_samples, upright


def _stem(shard: str) -> str:
    name = posixpath.basename(shard.rstrip("/"))
    for suffix in TAR_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def file_names(
    rows: list[dict], extensions: dict[tuple[str, str], str]
) -> dict[tuple[str, str], str]:
    """(shard, key) -> `file_name` of each image row: the key with its image member's
    extension (`extensions`; a bare key when unknown), below the shard's name without its
    suffix when a key occurs in more than one shard."""
    repeated = any(n > 1 for n in Counter(r["key"] for r in rows).values())
    names = {}
    for r in rows:
        ext = extensions.get((r["shard"], r["key"]))
        name = r["key"] + (f".{ext}" if ext else "")
        names[(r["shard"], r["key"])] = f"{_stem(r['shard'])}/{name}" if repeated else name
    return names


def _as_given(shards: list[str], inputs: list[str]) -> dict[str, str]:
    """Table shard -> the literal input (brace ranges expanded) that named it: the same
    URL, or for a local shard (stored absolute) a relative path that ends it."""
    given = {}
    for item in (e for i in inputs for e in braceexpand(i)):
        plain = item.removeprefix("file://")
        for shard in shards:
            if shard == item or (
                not os.path.isabs(plain)
                and "://" not in plain
                and shard.endswith("/" + posixpath.normpath(plain))
            ):
                given.setdefault(shard, item)
    return given


def _extensions(source: str, keys: set[str]) -> dict[str, str]:
    """key -> its image member's extension, for `keys` of the shard at `source` (tar
    headers only: members are skipped, not read)."""
    found: dict[str, str] = {}
    members: dict[str, dict[str, bytes]] = {}
    store = Store(source)
    with store.open_read(store.root) as stream:
        for key, ext, _ in tar_members(stream):
            if key in keys and key not in found:
                members.setdefault(key, {})[ext] = b""
    for key, exts in members.items():
        try:
            found[key] = pick_image_member(exts)[0]
        except ValueError:
            pass
    return found


def _relative(target: str, root: str) -> str:
    """`target` relative to `root` when both are local or on the same URL host, else
    `target` itself."""
    target, root = target.removeprefix("file://"), root.removeprefix("file://")
    if "://" not in target and "://" not in root:
        return os.path.relpath(os.path.abspath(target), os.path.abspath(root)).replace(os.sep, "/")
    t_scheme, _, t_path = target.partition("://")
    r_scheme, _, r_path = root.partition("://")
    t_host, r_host = t_path.split("/", 1)[0], r_path.split("/", 1)[0]
    if (t_scheme, t_host) == (r_scheme, r_host):
        return posixpath.relpath(t_path, r_path)
    return target


def _upright_bytes(data: bytes, ext: str, size: tuple[int, int]) -> bytes:
    """The image member `data` as the labeler saw it (EXIF orientation applied), in its
    format: its own bytes when already upright."""
    try:
        return upright(data, size)[0]
    except Exception:  # noqa: BLE001 - re-encode the decoded pixels instead
        picture = decode_image(data)
        fmt = Image.registered_extensions().get("." + ext.rsplit(".", 1)[-1].lower(), "PNG")
        buffer = io.BytesIO()
        picture.save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
        return buffer.getvalue()


def _image_extensions(wanted: dict[str, set[str]], located: dict[str, str]) -> dict:
    """(shard, key) -> the image member's extension, read from the source shards (an
    unreadable shard leaves its keys without one)."""
    extensions: dict[tuple[str, str], str] = {}
    for shard, keys in wanted.items():
        try:
            found = _extensions(located.get(shard, shard), keys)
        except Exception:  # noqa: BLE001 - an unreadable shard leaves its keys bare
            found = {}
        extensions.update(((shard, k), e) for k, e in found.items())
    return extensions


def _copy_images(
    rows: list[dict],
    wanted: dict[str, set[str]],
    located: dict[str, str],
    extensions: dict,
    names: dict,
    images_dir: str,
) -> int:
    """Write the labeled images, upright, from their source shards into `images_dir` under
    their COCO file names; returns how many were written."""
    target, written = Store(images_dir), 0
    for shard, keys_here in wanted.items():
        sizes = {r["key"]: (r["width"], r["height"]) for r in rows if r["shard"] == shard}
        for key, members in iter_samples(located.get(shard, shard)):
            if key in keys_here and (shard, key) in extensions:
                ext, data = pick_image_member(dict(members))
                target.write(names[(shard, key)], _upright_bytes(data, ext, sizes[key]))
                written += 1
                keys_here = keys_here - {key}
    return written


def _annotations(out: Store, ids: dict[tuple[str, str], int]) -> list[dict]:
    """The COCO annotations of the masks of the images in `ids` ((shard, key) -> id)."""
    masks = read_table(
        out, MASKS_DIR, ["shard", "key", "label_id", "score", "mask", "bbox", "area"]
    )
    annotations = []
    for row in masks.to_pylist():
        image_id = ids.get((row["shard"], row["key"]))
        # area 0: an empty mask, which runs no longer write but older outputs may hold
        if image_id is None or row["area"] == 0:
            continue
        annotations.append(
            {
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": row["label_id"] + 1,
                "segmentation": {
                    "size": list(row["mask"]["size"]),
                    "counts": row["mask"]["counts"],
                },
                "area": int(row["area"]),
                "bbox": [float(v) for v in row["bbox"]],
                "iscrowd": 0,
                "score": float(row["score"]),
            }
        )
    return annotations


def coco_dict(
    out: Store | str,
    sources: list[str] | None = None,
    images_dir: str | None = None,
    images_root: str | None = None,
) -> tuple[dict, Counter]:
    """The COCO dataset dict of the output `out` and counts (`written` images,
    `unresolved` ones whose extension could not be read); see the module docstring."""
    out = as_store(out)
    manifest = read_manifest(out) or {}
    images = read_table(out, IMAGES_DIR, ["shard", "key", "width", "height", "status"])
    # every shard of the tables: sources may name shards without an ok image
    shards = sorted(set(images["shard"].to_pylist()))
    images = images.filter(pc.equal(images["status"], "ok")).sort_by(
        [("shard", "ascending"), ("key", "ascending")]
    )
    rows = images.to_pylist()
    located = match_sources(shards, expand_inputs(sources)) if sources else {}
    given = _as_given(shards, manifest.get("inputs") or [])
    wanted: dict[str, set[str]] = {}
    for r in rows:
        wanted.setdefault(r["shard"], set()).add(r["key"])
    counts: Counter = Counter()
    extensions = _image_extensions(wanted, located)
    names = file_names(rows, extensions)
    counts["unresolved"] += sum(image not in extensions for image in names)
    if images_dir is not None:
        counts["written"] += _copy_images(rows, wanted, located, extensions, names, images_dir)
        lead = _relative(images_dir, images_root)
        names = {k: posixpath.normpath(posixpath.join(lead, v)) for k, v in names.items()}
    ids = {(row["shard"], row["key"]): i + 1 for i, row in enumerate(rows)}
    coco_images = [
        {
            "id": ids[(row["shard"], row["key"])],
            "file_name": names[(row["shard"], row["key"])],
            "width": row["width"],
            "height": row["height"],
            "shard": given.get(row["shard"], row["shard"]),
        }
        for row in rows
    ]
    categories = [
        {"id": i + 1, "name": name, "supercategory": "gemlabel"}
        for i, name in sorted(class_names(out).items())
    ]
    data = {
        "info": {"description": f"gemlabel masks of {out.display()}"},
        "images": coco_images,
        "categories": categories,
        "annotations": _annotations(out, ids),
    }
    return data, counts


def export_coco(
    out: Store | str,
    path: str,
    sources: list[str] | None = None,
    images_dir: str | None = None,
    images_root: str | None = None,
) -> dict:
    """Write the COCO JSON of `out` to `path` (a local path or URL) and, with `images_dir`,
    the images it references; return counts. `images_root` (default: the directory of
    `path`): what `file_name` is relative to when images are written."""
    out = as_store(out)
    store, name = split_file(path)
    root = images_root if images_root is not None else store.display()
    data, counts = coco_dict(out, sources, images_dir, root)
    store.write_text(name, json.dumps(data))
    result = {k: len(data[k]) for k in ("images", "categories", "annotations")}
    return result | {k: counts[k] for k in ("written", "unresolved") if counts[k]}
