"""Vocabularies: text files, CSV/Parquet columns, synonyms, built-ins."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.prompts.vocab import BUILTIN, class_names, load_vocabulary, split_column, synonyms

SIZES = {
    "voc": 20,
    "context59": 59,
    "ade150": 150,
    "coco80": 80,
    "coco-stuff171": 171,
    "cityscapes19": 19,
    "imagenet1k": 1000,
    "imagenet21k": 21843,
}


def test_builtin_vocabularies_have_their_sizes():
    assert set(BUILTIN) == set(SIZES)
    for name, size in SIZES.items():
        entries = load_vocabulary(name)
        assert len(entries) == size, name
        assert all(e and e == e.strip() for e in entries)
    voc = load_vocabulary("voc")
    assert voc[0] == "aeroplane" and voc[-1] == "tv monitor" and "background" not in voc
    assert load_vocabulary("coco-stuff171")[:80] == load_vocabulary("coco80")
    assert load_vocabulary("cityscapes19")[-1] == "bicycle"
    assert load_vocabulary("ade150")[-1] == "flag"
    assert load_vocabulary("imagenet1k")[0] == "tench"
    assert load_vocabulary("imagenet21k")[4].startswith("person; individual; someone")


def test_blank_lines_duplicates_and_synonyms(tmp_path, caplog):
    path = tmp_path / "v.txt"
    path.write_text("sofa ;  couch\n\n   \n# comment\ncat\nsofa; couch\n;\nred   car\n")
    caplog.set_level("INFO")
    entries = load_vocabulary(str(path))
    assert entries == ["sofa; couch", "cat", "red car"]
    assert "1 duplicate" in caplog.text and "3 blank" in caplog.text
    assert synonyms("sofa; couch") == ["sofa", "couch"]
    assert class_names(entries) == ["sofa", "cat", "red car"]


def test_csv_and_parquet_columns(tmp_path):
    csv = tmp_path / "v.csv"
    csv.write_text("id,name,other\n1,cat,x\n2,sofa; couch,y\n3,,z\n4,cat,w\n")
    assert load_vocabulary(str(csv)) == ["cat", "sofa; couch"]  # the `name` column
    assert load_vocabulary(f"{csv}:other") == ["x", "y", "z", "w"]
    assert load_vocabulary(str(csv), column="other") == ["x", "y", "z", "w"]
    parquet = tmp_path / "v.parquet"
    pq.write_table(pa.table({"label": ["dog", None, "tree"], "n": [1, 2, 3]}), parquet)
    assert load_vocabulary(f"{parquet}:label") == ["dog", "tree"]
    with pytest.raises(ValueError, match="choose one"):
        load_vocabulary(str(parquet))
    with pytest.raises(ValueError, match="no column 'nope'"):
        load_vocabulary(f"{parquet}:nope")
    assert split_column("s3://b/x.csv:name", None) == ("s3://b/x.csv", "name")
    assert split_column("s3://b/x.txt", None) == ("s3://b/x.txt", None)


def test_missing_file_and_empty_vocabulary(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_vocabulary(str(tmp_path / "missing.txt"))
    (tmp_path / "e.txt").write_text("\n;\n")
    with pytest.raises(ValueError, match="no class names"):
        load_vocabulary(str(tmp_path / "e.txt"))
