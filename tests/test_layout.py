"""The output root as datasets.

Each table is a dataset of its own and the bookkeeping is out of the way: pointed at a
table's folder, or globbing `OUT/<table>/**/*.parquet` or `OUT/**/*.parquet`, pandas,
pyarrow, DuckDB, polars, Ray Data and Hugging Face `datasets` get exactly the tables' rows,
also after `gemlabel view` and `gemlabel report` wrote to their default places. An output
of the previous layout (`OUT/_scan.parquet`) resumes: its cache is read, the new one
written and the old one deleted.
"""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.cli import DEFAULT_GALLERY, DEFAULT_REPORT, main
from pipeline.run import run
from pipeline.storage import output

pytestmark = pytest.mark.slow
OLD_SCAN_CACHE = "_scan.parquet"  # the previous layout's cache (Parquet, among the tables)


def table_rows(out: Path, table: str) -> int:
    """Rows of a table, from the Parquet footers of its committed files."""
    return sum(pq.ParquetFile(p).metadata.num_rows for p in (out / table).glob("*.parquet"))


@pytest.fixture(scope="module")
def labeled(labeled_output, tmp_path_factory):
    """A copy of the shared finished run (several files per table), with the gallery and
    the report written where `gemlabel view` and `gemlabel report` put them by default."""
    out = tmp_path_factory.mktemp("layout") / "out"
    shutil.copytree(labeled_output["out"], out)
    assert main(["view", str(out)]) == 0 and main(["report", str(out)]) == 0
    assert (out / DEFAULT_GALLERY / "index.html").exists() and (out / DEFAULT_REPORT).exists()
    totals = output.read_manifest(str(out))["totals"]
    images, masks = table_rows(out, "images"), table_rows(out, "masks")
    assert (images, masks) == (totals["images"], totals["masks"]) and images == 14 and masks
    return {
        "config": labeled_output["config"],
        "out": out,
        "images": images,
        "ok": totals["ok"],
        "masks": masks,
    }


def test_only_the_tables_end_in_parquet(labeled):
    out = labeled["out"]
    parquet = {p.relative_to(out).parts[0] for p in out.rglob("*.parquet")}
    assert parquet == {"images", "masks"}, sorted(out.rglob("*.parquet"))
    assert (out / output.SCAN_CACHE).exists() and not (out / OLD_SCAN_CACHE).exists()
    assert not output.SCAN_CACHE.endswith(".parquet")


def check_readers(out: Path, images: int, masks: int, tmp_path: Path) -> None:
    """The README's one-liners, each against the tables' row counts."""
    import pandas as pd

    assert len(pd.read_parquet(out / "images")) == images
    assert len(pd.read_parquet(out / "masks")) == masks
    assert pq.read_table(out / "masks").num_rows == masks

    duckdb = pytest.importorskip("duckdb")

    def rows(sql: str) -> int:
        return duckdb.sql(sql).fetchall()[0][0]

    count = "SELECT count(*) FROM read_parquet('{}', union_by_name = true)"
    assert rows(count.format(out / "images/**/*.parquet")) == images
    assert rows(count.format(out / "masks/**/*.parquet")) == masks
    assert rows(count.format(out / "**/*.parquet")) == images + masks
    assert rows(f"SELECT count(*) FROM '{out}/images/*.parquet'") == images
    by_label = f"SELECT label, count(*) FROM '{out}/masks/*.parquet' GROUP BY label"
    assert sum(n for _, n in duckdb.sql(by_label).fetchall()) == masks

    pl = pytest.importorskip("polars")
    assert pl.read_parquet(out / "images/*.parquet").height == images
    assert pl.scan_parquet(out / "masks/**/*.parquet").select(pl.len()).collect().item() == masks
    both = pl.scan_parquet(out / "**/*.parquet", missing_columns="insert", extra_columns="ignore")
    assert both.select(pl.len()).collect().item() == images + masks

    import ray

    assert ray.data.read_parquet(str(out / "images")).count() == images
    assert ray.data.read_parquet(str(out / "masks")).count() == masks


def test_readers_get_exactly_the_tables_rows(labeled, tmp_path):
    check_readers(labeled["out"], labeled["images"], labeled["masks"], tmp_path)


def test_hugging_face_datasets_one_call_per_table(labeled, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out, cache = labeled["out"], str(tmp_path / "hf")
    for table in ("images", "masks"):
        loaded = datasets.load_dataset(
            "parquet", data_files={table: f"{out}/{table}/*.parquet"}, cache_dir=cache
        )
        assert loaded[table].num_rows == labeled[table]


def test_coco_export_opens_in_pycocotools(labeled, tmp_path):
    from pycocotools.coco import COCO

    out = labeled["out"]
    assert main(["export", "coco", str(out), str(tmp_path / "coco.json")]) == 0
    coco = COCO(str(tmp_path / "coco.json"))
    assert len(coco.getImgIds()) == labeled["ok"]  # the error rows have no picture
    areas = pq.read_table(out / "masks", columns=["area"])["area"].to_pylist()
    assert len(coco.getAnnIds()) == sum(a > 0 for a in areas)


def to_old_layout(out: Path) -> None:
    """What the previous version left: the scan cache as `OUT/_scan.parquet`."""
    with pa.memory_map(str(out / output.SCAN_CACHE)) as source:
        table = pa.ipc.open_file(source).read_all()
    pq.write_table(table, out / OLD_SCAN_CACHE)
    shutil.rmtree(out / output.STATE_DIR)


def test_an_output_of_the_previous_layout_resumes(labeled, tmp_path):
    """Its `_scan.parquet` is read (a scan does not open the files it counted), a resume
    finishes it with every sample once, writes the new cache and deletes the old one."""
    out = tmp_path / "out"
    shutil.copytree(labeled["out"], out)
    to_old_layout(out)
    damaged = tmp_path / "damaged"
    shutil.copytree(out, damaged)
    for table in ("images", "masks"):
        for path in (damaged / table).iterdir():
            path.write_bytes(b"not parquet")  # a scan that read them again would fail
    cached = output.scan(str(damaged))
    assert sum(cached.rows.values()) == labeled["images"]
    assert sum(cached.masks.values()) == labeled["masks"]

    # interrupt it: one images file (and its masks twin) was never written
    lost = sorted((out / "images").glob("*.parquet"))[0]
    lost.unlink()
    (out / "masks" / lost.name).unlink(missing_ok=True)
    assert run(replace(labeled["config"], out=str(out))).status == "complete"
    assert not (out / OLD_SCAN_CACHE).exists() and (out / output.SCAN_CACHE).exists()
    keys = pq.read_table(out / "images", columns=["shard", "key"]).to_pylist()
    assert len(keys) == len({(k["shard"], k["key"]) for k in keys}) == labeled["images"]
    check_readers(out, labeled["images"], table_rows(out, "masks"), tmp_path)


def test_the_run_records_its_class_names_and_readers_need_nothing_else(labeled, tmp_path):
    """classes.json holds the vocabulary by label_id; with the vocabulary file gone, the
    COCO categories still name every class."""
    out = tmp_path / "out"
    shutil.copytree(labeled["out"], out)
    vocabulary = Path(labeled["config"].vocab).read_text().split()
    assert json.loads((out / output.CLASSES).read_text()) == vocabulary
    manifest = output.read_manifest(str(out))
    output.write_manifest(str(out), {**manifest, "vocabulary_file": str(tmp_path / "gone.txt")})
    assert main(["export", "coco", str(out), str(tmp_path / "coco.json")]) == 0
    categories = json.loads((tmp_path / "coco.json").read_text())["categories"]
    assert [c["name"] for c in categories] == vocabulary
