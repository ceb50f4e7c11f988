"""The write stage: masks for ok rows, both tables, atomic deterministic files.

A batch becomes `masks/<h>.parquet` (only when it has mask rows) and then
`images/<h>.parquet`, where `<h>` hashes the batch's (shard, key) pairs: a retried task
rewrites the same files instead of adding copies, and the images file, written last (each
file appears whole or not at all), commits the batch's keys (see pipeline.storage.output).
Rows are sorted by (shard, key) (and label_id for masks), so equal inputs give equal files.
"""

import hashlib
import posixpath

import numpy as np
import pyarrow as pa

from pipeline.stages.masks import encode_masks, masks_from_runs
from pipeline.storage.output import IMAGES_DIR, MASKS_DIR
from pipeline.storage.schema import IMAGES_SCHEMA, MASKS_SCHEMA
from pipeline.storage.store import Store, as_store

SUMMARY_COLUMNS = ("shard", "key", "status", "error", "masks", "dropped_empty", "file", "node")


def batch_name(shards, keys) -> str:
    """The file name of a batch: a hash of its sorted (shard, key) pairs."""
    digest = hashlib.sha256()
    for shard, key in sorted(zip(shards, keys, strict=True)):
        digest.update(f"{shard}\0{key}\n".encode())
    return f"{digest.hexdigest()[:32]}.parquet"


def _size(value) -> int | None:
    return int(value) if value is not None and int(value) > 0 else None


def _mask_rows(
    batch: dict[str, np.ndarray], i: int, size: tuple, mask_threshold: float, mask_mode: str
) -> list[dict]:
    """Row `i`'s mask rows: from the labeling actor's runs, or encoded from its logits."""
    labels = np.asarray(batch["labels"][i], dtype=np.int32).reshape(-1)
    scores = np.asarray(batch["scores"][i], dtype=np.float32).reshape(-1)
    height, width = size
    if "runs" in batch:  # masks made by the labeling actor
        runs, lengths = batch["runs"][i], batch["run_lengths"][i]
        return masks_from_runs(runs, lengths, labels, scores, height, width)
    logits = np.asarray(batch["logits"][i], dtype=np.float32)
    background = batch["background"][i] if "background" in batch else None
    return encode_masks(
        logits, labels, scores, height, width, mask_threshold, mask_mode, background
    )


def _write_tables(out: Store, name: str, images: list[dict], masks: list[dict]) -> None:
    """The masks file (when there are mask rows), then the images file that commits them."""
    if masks:
        table = pa.Table.from_pylist(masks, schema=MASKS_SCHEMA)
        table = table.sort_by([(c, "ascending") for c in ("shard", "key", "label_id")])
        out.write_table(posixpath.join(MASKS_DIR, name), table)
    table = pa.Table.from_pylist(images, schema=IMAGES_SCHEMA)
    table = table.sort_by([("shard", "ascending"), ("key", "ascending")])
    out.write_table(posixpath.join(IMAGES_DIR, name), table)


def _sample_rows(
    batch: dict[str, np.ndarray],
    i: int,
    class_names: list[str],
    mask_threshold: float,
    mask_mode: str,
) -> tuple[dict, list[dict]]:
    """Row `i`'s images row and mask rows; a mask encoding failure makes it an error row."""
    shard, key = str(batch["shard"][i]), str(batch["key"][i])
    error = batch["error"][i] if isinstance(batch["error"][i], str) else None
    labels = np.asarray(batch["labels"][i], dtype=np.int32).reshape(-1)
    scores = np.asarray(batch["scores"][i], dtype=np.float32).reshape(-1)
    width, height = _size(batch["width"][i]), _size(batch["height"][i])
    rows = []
    if error is None:
        try:
            rows = _mask_rows(batch, i, (height, width), mask_threshold, mask_mode)
        except Exception as err:  # noqa: BLE001 - a bad row is data, not a crash
            error, rows = f"encode: {type(err).__name__}: {err}", []
    if error is not None:
        labels, scores = labels[:0], scores[:0]
    image = {
        "key": key,
        "shard": shard,
        "width": width,
        "height": height,
        "status": "ok" if error is None else "error",
        "error": error,
        "labels": labels.tolist(),
        "scores": scores.tolist(),
    }
    masks = [
        {
            "key": key,
            "shard": shard,
            "label_id": int(row["label_id"]),
            "label": class_names[int(row["label_id"])],
            "score": float(row["score"]),
            "mask": row["mask"],
            "bbox": [float(v) for v in row["bbox"]],
            "area": int(row["area"]),
        }
        for row in rows
    ]
    return image, masks


def write_batch(
    batch: dict[str, np.ndarray],
    out: Store | str,
    class_names: list[str],
    mask_threshold: float,
    mask_mode: str,
) -> dict[str, np.ndarray]:
    """Encode masks (or compress the labeling actor's mask runs), write the batch's masks and
    images files, return one summary row per sample: shard, key, status, error, masks
    (count), dropped_empty (kept classes without a mask), file (the images file's name),
    node (the Ray node id of the labeling actor, "" when unknown).

    A row whose mask encoding fails becomes an error row ("encode: ...")."""
    out = as_store(out)
    shards, keys = [str(s) for s in batch["shard"]], [str(k) for k in batch["key"]]
    if not keys:
        return {name: np.array([], dtype=object) for name in SUMMARY_COLUMNS}
    images, masks, counts, dropped = [], [], [], []
    for i in range(len(keys)):
        image, rows = _sample_rows(batch, i, class_names, mask_threshold, mask_mode)
        images.append(image)
        masks += rows
        counts.append(len(rows))
        dropped.append(len(image["labels"]) - len(rows))
    name = batch_name(shards, keys)
    _write_tables(out, name, images, masks)
    return {
        "shard": np.array(shards, dtype=object),
        "key": np.array(keys, dtype=object),
        "status": np.array([row["status"] for row in images], dtype=object),
        "error": np.array([row["error"] for row in images], dtype=object),
        "masks": np.array(counts, dtype=np.int64),
        "dropped_empty": np.array(dropped, dtype=np.int64),
        "file": np.array([name] * len(keys), dtype=object),
        "node": np.array(batch["node"] if "node" in batch else [""] * len(keys), dtype=object),
    }
