"""The write stage: masks for ok rows, both tables, atomic deterministic files.

A batch becomes `masks/<h>.parquet` (only when it has mask rows) and then
`images/<h>.parquet`, where `<h>` hashes the batch's (shard, key) pairs: a retried task
rewrites the same files instead of adding copies, and the images file, moved into place
last, commits the batch's keys (see pipeline.storage.output). Rows are sorted by (shard, key) (and
label_id for masks), so equal inputs give equal files.
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


def write_batch(
    batch: dict[str, np.ndarray],
    out: Store | str,
    class_names: list[str],
    mask_threshold: float,
    mask_mode: str,
) -> dict[str, np.ndarray]:
    """Encode masks (or compress the labeling actor's mask runs), write the batch's masks and
    images files, return one summary row per sample: shard, key, status, error, masks
    (count), file (the images file's name), node (the Ray node id of the labeling actor, ""
    when unknown).

    A row whose mask encoding fails becomes an error row ("encode: ...")."""
    out = as_store(out)
    shards, keys = [str(s) for s in batch["shard"]], [str(k) for k in batch["key"]]
    if not keys:
        return {name: np.array([], dtype=object) for name in SUMMARY_COLUMNS}
    images = {name: [] for name in IMAGES_SCHEMA.names}
    masks = {name: [] for name in MASKS_SCHEMA.names}
    counts, dropped = [], []
    for i, (shard, key) in enumerate(zip(shards, keys, strict=True)):
        error = batch["error"][i] if isinstance(batch["error"][i], str) else None
        labels = np.asarray(batch["labels"][i], dtype=np.int32).reshape(-1)
        scores = np.asarray(batch["scores"][i], dtype=np.float32).reshape(-1)
        width, height = _size(batch["width"][i]), _size(batch["height"][i])
        rows = []
        if error is None:
            try:
                if "runs" in batch:  # masks made by the labeling actor
                    runs, lengths = batch["runs"][i], batch["run_lengths"][i]
                    rows = masks_from_runs(runs, lengths, labels, scores, height, width)
                else:
                    logits = np.asarray(batch["logits"][i], dtype=np.float32)
                    background = batch["background"][i] if "background" in batch else None
                    rows = encode_masks(
                        logits, labels, scores, height, width, mask_threshold, mask_mode, background
                    )
            except Exception as err:  # noqa: BLE001 - a bad row is data, not a crash
                error, rows = f"encode: {type(err).__name__}: {err}", []
        if error is not None:
            labels, scores = labels[:0], scores[:0]
        for row in rows:
            masks["key"].append(key)
            masks["shard"].append(shard)
            masks["label_id"].append(int(row["label_id"]))
            masks["label"].append(class_names[int(row["label_id"])])
            masks["score"].append(float(row["score"]))
            masks["mask"].append(row["mask"])
            masks["bbox"].append([float(v) for v in row["bbox"]])
            masks["area"].append(int(row["area"]))
        for name, value in (
            ("key", key),
            ("shard", shard),
            ("width", width),
            ("height", height),
            ("status", "ok" if error is None else "error"),
            ("error", error),
            ("labels", labels.tolist()),
            ("scores", scores.tolist()),
        ):
            images[name].append(value)
        counts.append(len(rows))
        dropped.append(len(labels) - len(rows))

    name = batch_name(shards, keys)
    if masks["key"]:
        table = pa.Table.from_pydict(masks, schema=MASKS_SCHEMA)
        table = table.sort_by([(c, "ascending") for c in ("shard", "key", "label_id")])
        out.write_table(posixpath.join(MASKS_DIR, name), table)
    table = pa.Table.from_pydict(images, schema=IMAGES_SCHEMA)
    table = table.sort_by([("shard", "ascending"), ("key", "ascending")])
    out.write_table(posixpath.join(IMAGES_DIR, name), table)
    return {
        "shard": np.array(shards, dtype=object),
        "key": np.array(keys, dtype=object),
        "status": np.array(images["status"], dtype=object),
        "error": np.array(images["error"], dtype=object),
        "masks": np.array(counts, dtype=np.int64),
        "dropped_empty": np.array(dropped, dtype=np.int64),
        "file": np.array([name] * len(keys), dtype=object),
        "node": np.array(batch["node"] if "node" in batch else [""] * len(keys), dtype=object),
    }
