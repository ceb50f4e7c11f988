"""`filter_output`: a filtered copy of an output directory's tables, without the model.

Semantics, applied to each image on its own:

1. A mask row is kept when it passes every given criterion: `score >= min_score`, `label`
   (the class name) in `classes`, `area >= min_area` (pixels at the original resolution).
2. Of an image's kept mask rows, at most `max_masks_per_image` stay: the highest scores
   (ties: the lower `label_id`).
3. Every images row is kept (one row per input sample, as before). Error rows are copied
   unchanged; an ok row's `labels`/`scores` keep exactly the classes whose mask row was
   kept, in their original order (best first); an image may end up with none.

Files keep their names (`images/<h>.parquet` and its `masks/` twin), are written
atomically masks first, and a rerun skips images files already written, so an interrupted
filter resumes. Shard stats (`_shards/`) are copied, so completeness carries over, and so
are the class names (`classes.json`); the manifest is the source's with the filter recorded
in `filter` and in `config` (a `gemlabel run` into the filtered directory refuses to mix
unfiltered rows in).
"""

import json
import os
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.storage import output
from pipeline.storage.lock import OutputLock
from pipeline.storage.output import IMAGES_DIR, MASKS_DIR, SHARDS_DIR
from pipeline.storage.schema import IMAGES_SCHEMA, MASKS_SCHEMA
from pipeline.storage.store import Store, as_store
from pipeline.tools.classes import class_names


@dataclass(frozen=True)
class FilterSpec:
    """Which mask rows to keep (None: no constraint). See the module docstring."""

    min_score: float | None = None
    classes: tuple[str, ...] | None = None
    min_area: int | None = None
    max_masks_per_image: int | None = None

    def __post_init__(self):
        if self.max_masks_per_image is not None and self.max_masks_per_image < 0:
            raise ValueError("max_masks_per_image must be >= 0")
        if self.classes is not None and not self.classes:
            raise ValueError("classes must name at least one class")


def _identity(shard: pa.Array, key: pa.Array, label=None) -> pa.Array:
    parts = [shard, key] + ([pc.cast(label, pa.string())] if label is not None else [])
    return pc.binary_join_element_wise(*parts, "\x00")


def filter_masks(masks: pa.Table, spec: FilterSpec) -> pa.Table:
    """Rules 1 and 2 on mask rows; the result is sorted by (shard, key, label_id)."""
    keep = pa.scalar(True)
    if spec.min_score is not None:
        keep = pc.and_(keep, pc.greater_equal(masks["score"], spec.min_score))
    if spec.classes is not None:
        keep = pc.and_(keep, pc.is_in(masks["label"], value_set=pa.array(spec.classes)))
    if spec.min_area is not None:
        keep = pc.and_(keep, pc.greater_equal(masks["area"], spec.min_area))
    if not isinstance(keep, pa.Scalar):
        masks = masks.filter(keep)
    if spec.max_masks_per_image is not None and masks.num_rows:
        order = [("shard", "ascending"), ("key", "ascending"), ("score", "descending")]
        masks = masks.sort_by(order + [("label_id", "ascending")])
        ident = _identity(masks["shard"], masks["key"]).to_numpy(zero_copy_only=False)
        first = np.ones(len(ident), dtype=bool)
        first[1:] = ident[1:] != ident[:-1]
        index = np.arange(len(ident))
        rank = index - np.maximum.accumulate(np.where(first, index, 0))
        masks = masks.filter(pa.array(rank < spec.max_masks_per_image))
    return masks.sort_by([("shard", "ascending"), ("key", "ascending"), ("label_id", "ascending")])


def reduce_images(images: pa.Table, kept_masks: pa.Table) -> pa.Table:
    """Rule 3: every row stays; `labels`/`scores` keep the classes with a kept mask row."""
    columns = {name: images[name].combine_chunks() for name in IMAGES_SCHEMA.names}
    parents = pc.list_parent_indices(columns["labels"])
    labels = pc.list_flatten(columns["labels"])
    scores = pc.list_flatten(columns["scores"])
    shards, keys = pc.take(columns["shard"], parents), pc.take(columns["key"], parents)
    ident = _identity(shards, keys, labels)
    kept = _identity(kept_masks["shard"], kept_masks["key"], kept_masks["label_id"])
    keep = pc.is_in(ident, value_set=kept)
    counts = np.bincount(
        parents.to_numpy()[keep.to_numpy(zero_copy_only=False)], minlength=images.num_rows
    )
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    columns["labels"] = pa.ListArray.from_arrays(offsets, labels.filter(keep))
    columns["scores"] = pa.ListArray.from_arrays(offsets, scores.filter(keep))
    return pa.Table.from_pydict(columns, schema=IMAGES_SCHEMA)


def _filter_file(source: Store, name: str, has_masks: bool, dest: Store | str, spec) -> None:
    images = source.read_table(posixpath.join(IMAGES_DIR, name), schema=IMAGES_SCHEMA)
    masks = MASKS_SCHEMA.empty_table()
    if has_masks:
        masks = source.read_table(posixpath.join(MASKS_DIR, name), schema=MASKS_SCHEMA)
    kept = filter_masks(masks, spec)
    if kept.num_rows:
        dest.write_table(posixpath.join(MASKS_DIR, name), kept)
    dest.write_table(posixpath.join(IMAGES_DIR, name), reduce_images(images, kept))


def resolve_classes(out: Store | str, classes: str | None) -> tuple[str, ...] | None:
    """`--classes`: a vocabulary file (one name per line) or comma-separated names. Raises
    ValueError for names that are not classes of `out`."""
    out = as_store(out)
    if classes is None:
        return None
    if os.path.isfile(classes) or "://" in classes:
        from pipeline.prompts.vocab import load_vocabulary

        names = tuple(load_vocabulary(classes))
    else:
        names = tuple(n.strip() for n in classes.split(",") if n.strip())
    known = set(class_names(out).values())
    unknown = [n for n in names if n not in known]
    if unknown and known:
        raise ValueError(f"not classes of {out.display()}: {', '.join(unknown[:10])}")
    return names


def filter_output(
    out: Store | str, dest: Store | str, spec: FilterSpec, overwrite: bool = False, workers: int = 4
) -> dict:
    """Write the filtered copy of `out` to `dest`; return its manifest (see module doc).

    Raises output.ConfigMismatchError when `dest` holds another filter's results (unless
    `overwrite`) and ValueError when `out` has no manifest."""
    out = as_store(out)
    dest = as_store(dest)
    source = output.read_manifest(out)
    if source is None:
        raise ValueError(f"{out.display()} is not a gemlabel output (no manifest.json)")
    if out == dest:
        raise ValueError("the filtered output must go to another directory")
    recorded = json.loads(json.dumps(asdict(spec)))  # as the manifest stores it (lists)
    config = {**source.get("config", {}), "filter": recorded}
    with OutputLock(dest):  # one writer at a time, as for runs
        output.prepare(dest, config, overwrite=overwrite)
        output.remove_leftovers(dest)  # of an interrupted filter: nobody else writes here
        manifest = {k: v for k, v in source.items() if k not in ("shards", "totals", "timings")}
        manifest.update(config=config, filter=recorded, source=out.display(), status="incomplete")
        names = output.read_classes(out)
        if names is not None:  # outputs of earlier versions have none
            output.write_classes(dest, names)
        output.write_manifest(dest, manifest)

        done = {posixpath.basename(p) for p in dest.ls(IMAGES_DIR, ".parquet")}
        images, masks = output.table_files(out)
        with_masks = {posixpath.basename(p) for p in masks}
        todo = [posixpath.basename(p) for p in images if posixpath.basename(p) not in done]
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            list(pool.map(lambda n: _filter_file(out, n, n in with_masks, dest, spec), todo))
        for path in out.ls(SHARDS_DIR, ".json"):
            name = posixpath.join(SHARDS_DIR, posixpath.basename(path))
            dest.write(name, out.read(path))

        state = output.scan(dest, save=True)
        manifest.update(
            status=source.get("status", "complete"),
            shards=output.shard_report(state, list(source.get("shards", {}))),
            totals=output.totals(state),
            source_totals=source.get("totals"),
        )
        output.write_manifest(dest, manifest)
        return manifest
