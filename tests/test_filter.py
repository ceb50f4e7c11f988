"""The filter's rules on hand-made rows, without a run: which mask rows stay
(`filter_masks`) and what the images rows keep (`reduce_images`)."""

import pyarrow as pa
import pytest

from pipeline.storage.schema import IMAGES_SCHEMA, MASKS_SCHEMA
from pipeline.tools.filter import FilterSpec, filter_masks, reduce_images

NAMES = ["cat", "dog", "car", "tree"]


def masks_table(rows: list[tuple[str, str, int, float, int]]) -> pa.Table:
    """Mask rows from (shard, key, label_id, score, area)."""
    rle = {"size": [1, 1], "counts": "01"}
    return pa.Table.from_pylist(
        [
            dict(
                shard=s, key=k, label_id=i, label=NAMES[i], score=sc, mask=rle, bbox=[0] * 4, area=a
            )
            for s, k, i, sc, a in rows
        ],
        schema=MASKS_SCHEMA,
    )


ROWS = [
    ("b", "2", 3, 0.9, 50),
    ("a", "1", 2, 0.5, 10),
    ("a", "1", 0, 0.8, 400),
    ("a", "1", 1, 0.8, 5),  # ties 0.8 with label 0: the lower id ranks first
    ("a", "2", 1, 0.2, 100),
]


def kept(spec: FilterSpec) -> list[tuple[str, str, int]]:
    table = filter_masks(masks_table(ROWS), spec)
    return list(
        zip(
            table["shard"].to_pylist(),
            table["key"].to_pylist(),
            table["label_id"].to_pylist(),
            strict=True,
        )
    )


def test_no_constraint_keeps_every_row_sorted():
    assert kept(FilterSpec()) == [
        ("a", "1", 0),
        ("a", "1", 1),
        ("a", "1", 2),
        ("a", "2", 1),
        ("b", "2", 3),
    ]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (FilterSpec(min_score=0.8), [("a", "1", 0), ("a", "1", 1), ("b", "2", 3)]),
        (FilterSpec(classes=("dog", "tree")), [("a", "1", 1), ("a", "2", 1), ("b", "2", 3)]),
        (FilterSpec(min_area=50), [("a", "1", 0), ("a", "2", 1), ("b", "2", 3)]),
        (FilterSpec(max_masks_per_image=1), [("a", "1", 0), ("a", "2", 1), ("b", "2", 3)]),
        (
            FilterSpec(max_masks_per_image=2),
            [("a", "1", 0), ("a", "1", 1), ("a", "2", 1), ("b", "2", 3)],
        ),
        (FilterSpec(max_masks_per_image=0), []),
        # every criterion first, then the best of what is left per image
        (
            FilterSpec(min_area=10, max_masks_per_image=1),
            [("a", "1", 0), ("a", "2", 1), ("b", "2", 3)],
        ),
        (FilterSpec(min_score=0.3, classes=("car",), max_masks_per_image=1), [("a", "1", 2)]),
    ],
)
def test_criteria_then_the_best_per_image(spec, expected):
    assert kept(spec) == expected


def test_an_empty_table_stays_empty():
    assert (
        filter_masks(masks_table([]), FilterSpec(min_score=0.5, max_masks_per_image=1)).num_rows
        == 0
    )


def test_bad_specs_are_refused():
    with pytest.raises(ValueError, match="max_masks_per_image must be >= 0"):
        FilterSpec(max_masks_per_image=-1)
    with pytest.raises(ValueError, match="classes must name at least one class"):
        FilterSpec(classes=())


def test_images_keep_exactly_the_classes_of_kept_masks_in_their_order():
    images = pa.Table.from_pylist(
        [
            dict(
                key="1",
                shard="a",
                width=4,
                height=3,
                status="ok",
                error=None,
                labels=[1, 0, 2],
                scores=[0.9, 0.8, 0.5],
            ),
            dict(
                key="2",
                shard="a",
                width=4,
                height=3,
                status="ok",
                error=None,
                labels=[1],
                scores=[0.2],
            ),
            dict(
                key="3",
                shard="a",
                width=None,
                height=None,
                status="error",
                error="decode: bad",
                labels=[],
                scores=[],
            ),
        ],
        schema=IMAGES_SCHEMA,
    )
    masks = filter_masks(masks_table(ROWS), FilterSpec(min_score=0.5, classes=("dog", "car")))
    reduced = reduce_images(images, masks).to_pylist()
    assert [r["labels"] for r in reduced] == [[1, 2], [], []]
    assert reduced[0]["scores"] == pytest.approx([0.9, 0.5]) and reduced[1]["scores"] == []
    assert reduced[2]["error"] == "decode: bad" and reduced[2]["status"] == "error"
    assert [r["key"] for r in reduced] == ["1", "2", "3"]
