"""Reading an output without the model: its class names (`classes.json`, and the fallbacks
of outputs written before runs kept them), its masks (COCO RLE) and where its shards are."""

import numpy as np
import pyarrow as pa
import pytest
from pycocotools import mask as mask_utils

from pipeline.prompts.vocab import load_vocabulary, vocabulary_hash
from pipeline.storage import output
from pipeline.storage.schema import MASKS_SCHEMA
from pipeline.storage.store import Store
from pipeline.storage.tables import class_names, decode_mask, match_sources
from pipeline.tools import classes


def test_class_names_are_read_back_as_written(tmp_path):
    names = [f"class {i}" for i in range(21_000)] + ["café; the one", 'with "quotes"']
    output.write_classes(str(tmp_path), names)
    assert class_names(str(tmp_path)) == names
    assert classes.vocabulary_size(str(tmp_path)) == len(names)
    text = (tmp_path / output.CLASSES).read_text()
    assert text.count("\n") == len(names) + 2 and "café" in text  # one name per line, UTF-8


def test_an_output_without_class_names_has_none(tmp_path):
    assert class_names(str(tmp_path)) is None


def old_output(tmp_path, vocab_text: str, masks: list[tuple[int, str]]) -> str:
    """An output as earlier versions wrote it: a manifest naming its vocabulary file, mask
    rows of `masks` (label_id, label), and no classes.json."""
    vocab = tmp_path / "vocab.txt"
    vocab.write_text(vocab_text)
    out = str(tmp_path / "out")
    entries = load_vocabulary(str(vocab))
    manifest = {
        "vocabulary_file": str(vocab),
        "config": {"vocabulary": {"hash": vocabulary_hash(entries), "classes": len(entries)}},
    }
    output.write_manifest(out, manifest)
    rle = {"size": [1, 1], "counts": "01"}
    rows = [
        dict(key="k", shard="s", label_id=i, label=n, score=0.5, mask=rle, bbox=[0] * 4, area=1)
        for i, n in masks
    ]
    Store(out).write_table("masks/a.parquet", pa.Table.from_pylist(rows, schema=MASKS_SCHEMA))
    Store(out).write_table("images/a.parquet", pa.table({"key": ["k"]}))
    return out


def test_an_older_output_reads_its_vocabulary_file_first_synonyms(tmp_path):
    out = old_output(tmp_path, "sofa; couch\ncat\ndog\n", [(1, "cat")])
    assert classes.class_names(out) == {0: "sofa", 1: "cat", 2: "dog"}
    assert classes.vocabulary_size(out) == 3


def test_an_older_output_whose_vocabulary_changed_reads_the_masks_names(tmp_path):
    out = old_output(tmp_path, "sofa\ncat\ndog\n", [(2, "dog"), (0, "sofa")])
    (tmp_path / "vocab.txt").write_text("sofa\ncat\ndog\nbird\n")  # another hash now
    assert classes.class_names(out) == {0: "sofa", 2: "dog"}


def test_recorded_class_names_win_over_a_vocabulary_file(tmp_path):
    out = old_output(tmp_path, "sofa\ncat\n", [(1, "cat")])
    output.write_classes(out, ["a sofa", "a cat"])
    (tmp_path / "vocab.txt").unlink()
    assert classes.class_names(out) == {0: "a sofa", 1: "a cat"}
    assert classes.vocabulary_size(out) == 2


def test_overwrite_deletes_the_class_names(tmp_path):
    out = str(tmp_path / "out")
    output.prepare(out, {"a": 1})
    output.write_manifest(out, {"config": {"a": 1}})
    output.write_classes(out, ["cat"])
    assert output.prepare(out, {"a": 2}, overwrite=True) is False
    assert class_names(out) is None


@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (64, 48)])
def test_decode_mask_inverts_pycocotools_encode(shape):
    mask = np.random.default_rng(sum(shape)).random(shape) > 0.5
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    stored = {"size": np.array(rle["size"], np.int32), "counts": rle["counts"].decode()}
    decoded = decode_mask(stored)
    assert decoded.dtype == bool and decoded.shape == shape
    assert np.array_equal(decoded, mask)


def test_match_sources_by_url_then_by_unique_file_name():
    table = ["s3://b/x/a.tar", "s3://b/x/b.tar", "s3://b/y/b.tar"]
    assert match_sources(table, ["s3://b/x/b.tar", "/local/a.tar"]) == {
        "s3://b/x/b.tar": "s3://b/x/b.tar",
        "s3://b/x/a.tar": "/local/a.tar",
    }
    with pytest.raises(ValueError, match="source /local/b.tar matches more than one shard"):
        match_sources(table, ["/local/b.tar"])
    with pytest.raises(ValueError, match="source /local/c.tar matches no shard"):
        match_sources(table, ["/local/c.tar"])
    assert match_sources(table, []) == {}
