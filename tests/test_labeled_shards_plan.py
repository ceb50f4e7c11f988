"""The labeled shards' plan on a hand-made output, without Ray: which samples go into
which output shard (ranges, not keys), the files each shard reads, the counts by kind, and
the refusal of an incompletely labeled shard."""

import json

import pyarrow as pa
import pytest

from pipeline.storage import output
from pipeline.storage.schema import IMAGES_SCHEMA, MASKS_SCHEMA
from pipeline.storage.store import Store
from pipeline.tools.labeled_shards import plan_shards, sample_kind, selected


def image(shard: str, key: str, kind: str) -> dict:
    ok = kind in ("labeled", "unlabeled")
    return dict(
        key=key,
        shard=shard,
        width=4 if ok else None,
        height=3 if ok else None,
        status="ok" if ok else "error",
        error=None if ok else "read: bad",
        labels=[0] if kind == "labeled" else [],
        scores=[0.5] if kind == "labeled" else [],
    )


@pytest.fixture
def out(tmp_path) -> str:
    """s0: 3 labeled, 1 unlabeled, 1 error sample; s1: 2 labeled; s2: unreadable (one
    row, key ""). Two images files, each holding parts of s0 and s1; masks twin of a only."""
    out = str(tmp_path / "out")
    store = Store(out)
    files = {
        "a.parquet": [image("s0", f"k{i}", "labeled") for i in range(3)]
        + [image("s1", "m0", "labeled")],
        "b.parquet": [image("s0", "k3", "unlabeled"), image("s0", "k4", "errors")]
        + [image("s1", "m1", "labeled"), image("s2", "", "errors")],
    }
    for name, rows in files.items():
        store.write_table(f"images/{name}", pa.Table.from_pylist(rows, schema=IMAGES_SCHEMA))
    store.write_table("masks/a.parquet", MASKS_SCHEMA.empty_table())
    store.write_table("masks/orphan.parquet", MASKS_SCHEMA.empty_table())  # not a table file
    stats = [{"shard": s, "samples": n} for s, n in (("s0", 5), ("s1", 2), ("s2", 1))]
    output.write_shard_stats(out, stats)
    return out


def parts(job: dict) -> list[list]:
    return json.loads(job["parts"])


def test_one_output_shard_per_source_shard_with_labeled_samples(out):
    jobs, counts = plan_shards(out, None)
    assert [j["name"] for j in jobs] == ["shard-000000.tar", "shard-000001.tar"]
    assert [parts(j) for j in jobs] == [[["s0", "s0", 0, 3]], [["s1", "s1", 0, 2]]]
    files = [json.loads(j["files"]) for j in jobs]
    assert files[0] == {"images": ["a.parquet", "b.parquet"], "masks": ["a.parquet"]}
    assert counts == {
        "labeled": 5,
        "unlabeled": 1,
        "errors": 2,  # a sample's and a whole shard's
        "labeled_selected": 5,
        "unlabeled_selected": 0,
        "errors_selected": 0,
    }


def test_samples_per_shard_cuts_ranges_across_source_shards(out):
    jobs, counts = plan_shards(
        out, None, include_unlabeled=True, include_errors=True, samples_per_shard=2, prefix="x"
    )
    assert [j["name"] for j in jobs] == [f"x-{i:06d}.tar" for i in range(4)]
    assert [parts(j) for j in jobs] == [
        [["s0", "s0", 0, 2]],
        [["s0", "s0", 2, 4]],
        [["s0", "s0", 4, 5], ["s1", "s1", 0, 1]],
        [["s1", "s1", 1, 2]],
    ]
    assert json.loads(jobs[3]["files"]) == {
        "images": ["a.parquet", "b.parquet"],
        "masks": ["a.parquet"],
    }
    assert counts["errors_selected"] == 1  # the whole-shard error has no sample to write


def test_sources_replace_the_shards_they_match(out, tmp_path):
    jobs, _ = plan_shards(out, [str(tmp_path / "moved" / "s1")])
    assert [parts(j) for j in jobs] == [[["s1", str(tmp_path / "moved" / "s1"), 0, 2]]]


def test_an_incompletely_labeled_shard_is_refused(out):
    output.write_shard_stats(out, [{"shard": "s1", "samples": 3}])  # one sample missing
    with pytest.raises(
        ValueError, match=r"1 shard\(s\) are not completely labeled .* \(e\.g\. s1\)"
    ):
        plan_shards(out, None)


@pytest.mark.parametrize(
    ("status", "labels", "kind"),
    [("ok", 2, "labeled"), ("ok", 0, "unlabeled"), ("error", 0, "errors")],
)
def test_sample_kinds_and_selection(status, labels, kind):
    assert sample_kind(status, labels) == kind
    assert selected(kind, "k", include_unlabeled=False, include_errors=False) == (kind == "labeled")
    assert selected(kind, "k", include_unlabeled=True, include_errors=True)
    assert not selected("errors", "", include_unlabeled=True, include_errors=True)
