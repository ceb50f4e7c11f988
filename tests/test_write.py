"""The write stage: both tables, fixed schemas, atomic and deterministic files."""

import numpy as np
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import pytest
import torch
from pycocotools import mask as mask_utils

from pipeline.stages.write import batch_name, write_batch
from pipeline.storage.schema import IMAGES_SCHEMA, MASKS_SCHEMA

NAMES = ["cat", "dog", "car", "tree"]


def column(values: list) -> np.ndarray:
    """A 1-d object array (one entry per row, even when the entries are arrays)."""
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def labeled_batch(n: int = 4, k: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """A batch as the Labeler emits it: the last row is an upstream error row."""
    rng = np.random.default_rng(seed)
    logits = [rng.normal(size=(k, 4, 4)).astype(np.float32) for _ in range(n - 1)]
    logits.append(np.zeros((0, 4, 4), np.float32))
    return {
        "shard": column([f"s{i % 2}.tar" for i in range(n)]),
        "key": column([f"{i:03d}" for i in range(n)]),
        "width": np.array([20 + i for i in range(n - 1)] + [0]),
        "height": np.array([10 + i for i in range(n - 1)] + [0]),
        "error": column([None] * (n - 1) + ["decode: broken"]),
        "labels": column([np.array([1, 3], np.int32)[:k]] * (n - 1) + [np.zeros(0, np.int32)]),
        "scores": column([np.array([0.6, 0.3], np.float32)[:k]] * (n - 1) + [np.zeros(0)]),
        "logits": column(logits),
    }


def permuted(batch, order):
    return {name: values[order] for name, values in batch.items()}


@pytest.mark.parametrize("scheme", ["", "file://"])
def test_tables_rows_and_masks(tmp_path, scheme):
    batch = labeled_batch()
    summary = write_batch(batch, scheme + str(tmp_path), NAMES, 0.5, "threshold")
    name = batch_name(batch["shard"], batch["key"])
    assert list(summary["file"]) == [name] * 4
    assert list(summary["status"]) == ["ok", "ok", "ok", "error"]
    assert list(summary["masks"]) == [2, 2, 2, 0]
    images = pq.read_table(tmp_path / "images" / name)
    masks = pq.read_table(tmp_path / "masks" / name)
    assert images.schema.equals(IMAGES_SCHEMA) and masks.schema.equals(MASKS_SCHEMA)
    rows = images.to_pylist()
    expected = sorted(zip(batch["shard"], batch["key"], strict=True))
    assert [(r["shard"], r["key"]) for r in rows] == expected
    error = next(r for r in rows if r["status"] == "error")
    assert error["error"] == "decode: broken" and error["labels"] == []
    assert error["width"] is None
    for m in masks.to_pylist():
        image = next(r for r in rows if (r["shard"], r["key"]) == (m["shard"], m["key"]))
        decoded = mask_utils.decode({"size": m["mask"]["size"], "counts": m["mask"]["counts"]})
        assert decoded.shape == (image["height"], image["width"])
        assert m["area"] == decoded.sum() and m["label"] == NAMES[m["label_id"]]
        assert m["label_id"] in image["labels"]
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_same_rows_same_file_retry_overwrites(tmp_path):
    batch = labeled_batch()
    write_batch(batch, str(tmp_path / "a"), NAMES, 0.5, "semantic")
    write_batch(permuted(batch, [3, 1, 0, 2]), str(tmp_path / "b"), NAMES, 0.5, "semantic")
    write_batch(batch, str(tmp_path / "b"), NAMES, 0.5, "semantic")  # a retried task
    for table in ("images", "masks"):
        [a] = (tmp_path / "a" / table).iterdir()
        [b] = (tmp_path / "b" / table).iterdir()
        assert a.name == b.name and a.read_bytes() == b.read_bytes()
    other = permuted(batch, [0, 1])
    assert batch_name(other["shard"], other["key"]) != batch_name(batch["shard"], batch["key"])


def test_encode_failure_becomes_error_row(tmp_path):
    batch = labeled_batch()
    batch["logits"][1] = np.zeros((5, 4, 4), np.float32)  # does not match its 2 labels
    summary = write_batch(batch, str(tmp_path), NAMES, 0.5, "threshold")
    assert list(summary["status"]) == ["ok", "error", "ok", "error"]
    assert summary["error"][1].startswith("encode: ValueError")
    rows = pds.dataset(tmp_path / "images").to_table().to_pylist()
    bad = next(r for r in rows if r["key"] == "001")
    assert bad["status"] == "error" and bad["labels"] == [] and bad["scores"] == []
    masks = pds.dataset(tmp_path / "masks").to_table()
    assert "001" not in masks.column("key").to_pylist() and masks.num_rows == 4


def test_hidden_temp_files_are_invisible_to_readers(tmp_path):
    write_batch(labeled_batch(), str(tmp_path), NAMES, 0.5, "threshold")
    (tmp_path / "images" / ".half-written.parquet.0123.tmp").write_bytes(b"PAR1 partial")
    assert pds.dataset(tmp_path / "images").to_table().num_rows == 4


@pytest.mark.parametrize("actor_masks", [False, True])
def test_empty_masks_are_not_written_but_counted(tmp_path, actor_masks):
    """A kept class whose mask covers no pixel gets no mask row; the summary counts it in
    `dropped_empty`, and the image keeps it in its top-k `labels`."""
    from pipeline.stages.masks import flat_masks, runs_of

    batch = labeled_batch()
    batch["logits"][0] = batch["logits"][0].copy()
    batch["logits"][0][1] = 2.5  # a constant map: an empty mask for label 3 of key 000
    if actor_masks:  # masks made on the labeling actor, handed over as runs
        runs = [
            runs_of([flat_masks(torch.from_numpy(g), h, w, 0.5)])[0]
            if h
            else (np.zeros(0, np.int32), np.zeros(0, np.int32))
            for g, h, w in zip(batch["logits"], batch["height"], batch["width"], strict=True)
        ]
        batch["runs"] = column([r for r, _ in runs])
        batch["run_lengths"] = column([n for _, n in runs])
        del batch["logits"]
    summary = write_batch(batch, str(tmp_path), NAMES, 0.5, "threshold")
    assert list(summary["masks"]) == [1, 2, 2, 0]
    assert list(summary["dropped_empty"]) == [1, 0, 0, 0]
    masks = pds.dataset(tmp_path / "masks").to_table().to_pylist()
    assert len(masks) == 5 and all(m["area"] > 0 for m in masks)
    assert [m["label_id"] for m in masks if m["key"] == "000"] == [1]
    images = pds.dataset(tmp_path / "images").to_table().to_pylist()
    assert next(r for r in images if r["key"] == "000")["labels"] == [1, 3]
