"""Mask encoding: the rule (upsample, min-max, threshold/semantic/background), COCO RLE,
bbox, area."""

import json
import weakref

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

import gem
from pipeline.stages import masks
from pipeline.stages.masks import encode_masks


def normalized(logits: np.ndarray, height: int, width: int) -> np.ndarray:
    """The reference maps: gem's bilinear upsampling and min-max, all classes at once."""
    maps = gem.min_max(gem.upsample(torch.from_numpy(logits)[None], (height, width)))
    return maps[0].numpy()


def decoded(result: dict) -> np.ndarray:
    return mask_utils.decode(
        {"size": result["mask"]["size"], "counts": result["mask"]["counts"].encode()}
    ).astype(bool)


def box_and_area(mask: np.ndarray) -> tuple[list[float], int]:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [0.0, 0.0, 0.0, 0.0], 0
    x0, y0 = xs.min(), ys.min()
    return [float(x0), float(y0), float(xs.max() - x0 + 1), float(ys.max() - y0 + 1)], len(xs)


def random_logits(k: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(k, h, w)).astype(np.float32)


def test_threshold_masks_round_trip_non_square():
    logits = random_logits(3, 3, 5)
    labels, scores = np.array([7, 2, 11]), np.array([0.9, 0.5, 0.25], dtype=np.float32)
    results = encode_masks(logits, labels, scores, 30, 50, threshold=0.5)
    want = normalized(logits, 30, 50) >= 0.5
    assert [r["label_id"] for r in results] == [7, 2, 11]
    assert [r["score"] for r in results] == pytest.approx([0.9, 0.5, 0.25])
    for r, w in zip(results, want, strict=True):
        assert r["mask"]["size"] == [30, 50]
        assert isinstance(r["mask"]["counts"], str)
        got = decoded(r)
        assert got.shape == (30, 50)
        assert np.array_equal(got, w)
        assert 0 < r["area"] < 30 * 50
        assert (r["bbox"], r["area"]) == box_and_area(got)
    json.dumps(results)  # plain types only


def test_orientation_is_kept():
    # one hot patch in the top-right corner of a 2x4 grid -> mask in the top-right corner
    logits = np.zeros((1, 2, 4), dtype=np.float32)
    logits[0, 0, 3] = 1.0
    (r,) = encode_masks(logits, np.array([0]), np.array([1.0]), 20, 40, threshold=0.9)
    mask = decoded(r)
    assert mask[0, 39] and not mask[19, 0] and not mask[0, 0]
    x, y, w, h = r["bbox"]
    assert x >= 20 and y == 0 and x + w == 40 and h <= 10


def test_semantic_masks_are_disjoint_argmax():
    logits = random_logits(4, 7, 5, seed=1)
    results = encode_masks(logits, np.arange(4), np.ones(4), 41, 29, threshold=0.3, mode="semantic")
    got = np.stack([decoded(r) for r in results])
    assert got.sum(axis=0).max() <= 1
    maps = normalized(logits, 41, 29)
    best = maps.max(axis=0)
    owner = np.where(best >= 0.3, maps.argmax(axis=0), -1)
    for c, r in enumerate(results):
        assert np.array_equal(got[c], owner == c)
        assert (r["bbox"], r["area"]) == box_and_area(got[c])


def test_background_masks_are_raw_argmax_against_the_background():
    logits = random_logits(3, 6, 5, seed=4)
    background = random_logits(1, 6, 5, seed=5)[0]
    results = encode_masks(
        logits, np.arange(3), np.ones(3), 23, 31, 0.5, mode="background", background=background
    )
    up = gem.upsample(torch.from_numpy(np.concatenate([background[None], logits]))[None], (23, 31))
    owner = up[0].numpy().argmax(axis=0) - 1  # -1: the background wins
    got = np.stack([decoded(r) for r in results])
    for c, r in enumerate(results):
        assert np.array_equal(got[c], owner == c)
        assert (r["bbox"], r["area"]) == box_and_area(got[c])
    assert (owner == -1).any() and all(r["area"] > 0 for r in results)
    # raw logits, not min-max: a class below the background everywhere gets nothing
    low = encode_masks(
        logits, np.arange(3), np.ones(3), 23, 31, 0.5, "background", logits.max(0) + 0.1
    )
    assert low == []  # and an empty mask is no label: no row
    with pytest.raises(ValueError, match="needs a background map"):
        encode_masks(logits, np.arange(3), np.ones(3), 23, 31, 0.5, mode="background")


def test_threshold_masks_may_overlap():
    logits = random_logits(2, 4, 4, seed=2)
    logits[1] = logits[0]
    a, b = encode_masks(logits, np.array([0, 1]), np.ones(2), 16, 16, threshold=0.2)
    assert a["mask"] == b["mask"] and a["area"] > 0
    (s1,) = encode_masks(logits, np.array([0, 1]), np.ones(2), 16, 16, 0.2, mode="semantic")
    assert s1["label_id"] == 0 and s1["area"] == a["area"]  # a tie goes to the earlier class


@pytest.mark.parametrize("mode", ["threshold", "semantic"])
def test_constant_map_gives_no_mask(mode):
    """A constant map's mask is empty, and a mask that covers no pixel is not a label: no
    row (the write stage counts it as dropped)."""
    logits = random_logits(2, 3, 3)
    logits[0] = 4.2
    results = encode_masks(logits, np.array([3, 4]), np.ones(2), 12, 9, threshold=0.01, mode=mode)
    assert [r["label_id"] for r in results] == [4]
    assert results[0]["area"] > 0 and decoded(results[0]).sum() == results[0]["area"]


@pytest.mark.parametrize("mode", masks.MASK_MODES)
def test_empty_masks_are_left_out_on_both_paths(mode):
    """Classes whose mask covers no pixel get no row, from encode_masks and from the
    labeling actor's runs alike; the others keep their order."""
    logits = random_logits(4, 5, 5, seed=7)
    logits[1] = 3.0  # constant: empty in threshold and semantic modes
    background = np.full((5, 5), logits.min() - 1, np.float32)
    if mode == "background":
        logits[1] = logits.min() - 10  # below the background everywhere
    labels, scores = np.array([9, 8, 7, 6]), np.array([0.4, 0.3, 0.2, 0.1], np.float32)
    want = encode_masks(logits, labels, scores, 20, 15, 0.5, mode, background)
    assert 8 not in [r["label_id"] for r in want] and want
    assert all(r["area"] > 0 and r["bbox"][2] > 0 for r in want)
    flat = masks.flat_masks(
        torch.from_numpy(logits), 20, 15, 0.5, mode, torch.from_numpy(background)
    )
    [(counts, lengths)] = masks.runs_of([flat])
    assert len(lengths) == 4  # the actor hands over every class's runs
    assert masks.masks_from_runs(counts, lengths, labels, scores, 20, 15) == want


def test_chunking_does_not_change_masks(monkeypatch):
    logits = random_logits(5, 4, 6, seed=3)
    args = (logits, np.arange(5), np.ones(5), 30, 45, 0.4)
    background = random_logits(1, 4, 6, seed=4)[0]
    for mode in ("threshold", "semantic", "background"):
        whole = encode_masks(*args, mode=mode, background=background)
        monkeypatch.setattr(masks, "_CHUNK_PIXELS", 30 * 45 * 2)  # two classes per chunk
        assert encode_masks(*args, mode=mode, background=background) == whole
        monkeypatch.undo()


def test_downsampling_and_tiny_images():
    logits = random_logits(2, 14, 14)
    (a, b) = encode_masks(logits, np.arange(2), np.ones(2), 1, 3, threshold=0.5)
    assert a["mask"]["size"] == [1, 3]
    want = normalized(logits, 1, 3) >= 0.5
    assert np.array_equal(decoded(a), want[0]) and np.array_equal(decoded(b), want[1])


def test_no_classes():
    assert (
        encode_masks(np.zeros((0, 3, 3), np.float32), np.array([]), np.array([]), 5, 5, 0.5) == []
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"labels": np.arange(3)}, "do not match"),
        ({"mode": "instance"}, "unknown mask mode"),
        ({"threshold": 0.0}, "threshold must be in"),
        ({"threshold": 1.5}, "threshold must be in"),
        ({"height": 0}, "image size must be positive"),
    ],
)
def test_invalid_arguments(kwargs, message):
    args = {
        "logits": random_logits(2, 3, 3),
        "labels": np.arange(2),
        "scores": np.ones(2),
        "height": 9,
        "width": 9,
        "threshold": 0.5,
    }
    with pytest.raises(ValueError, match=message):
        encode_masks(**(args | kwargs))


@pytest.mark.parametrize("mode", masks.MASK_MODES)
@pytest.mark.parametrize(("height", "width"), [(37, 61), (120, 90), (1, 1), (5, 1)])
def test_runs_from_the_actor_give_the_same_rows(mode, height, width):
    """flat_masks + runs_of (the labeling actor's path) + masks_from_runs == encode_masks."""
    logits, background = random_logits(4, 7, 9, seed=height), random_logits(1, 7, 9, seed=3)[0]
    labels, scores = np.array([5, 1, 7, 2]), np.array([0.5, 0.3, 0.1, 0.05], np.float32)
    want = encode_masks(logits, labels, scores, height, width, 0.4, mode, background)
    flat = masks.flat_masks(
        torch.from_numpy(logits), height, width, 0.4, mode, torch.from_numpy(background)
    )
    empty = masks.flat_masks(torch.zeros(0, 7, 9), 4, 4, 0.4)  # batched: offsets must hold
    (none, no_lengths), (counts, lengths), again = masks.runs_of([empty, flat, flat])
    assert len(none) == len(no_lengths) == 0
    np.testing.assert_array_equal(again[0], counts)
    assert counts.dtype == lengths.dtype == np.int32 and len(lengths) == 4
    assert masks.masks_from_runs(counts, lengths, labels, scores, height, width) == want


def test_runs_of_fetches_in_groups_under_a_budget():
    """Masks made lazily are fetched whenever `budget` pixels are held: the same runs as
    one fetch at the end, with the earlier images' masks freed instead of all held."""
    sizes = [(37, 61), (4, 4), (120, 90), (1, 1), (50, 3)]

    def fetch(budget):  # the runs, and how many earlier masks are alive as each is made
        refs, alive = [], []

        def made():
            for i, (h, w) in enumerate(sizes):
                logits = torch.from_numpy(random_logits(3, 7, 9, seed=i))
                alive.append(sum(ref() is not None for ref in refs))
                m = masks.flat_masks(logits, h, w, 0.4)
                refs.append(weakref.ref(m))
                yield m

        return masks.runs_of(made(), budget), alive

    want, held = fetch(1 << 40)
    got, bounded = fetch(1)
    assert held == [0, 1, 2, 3, 4] and max(bounded) <= 1
    assert len(got) == len(want) == len(sizes)
    for (a, b), (c, d) in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)


def test_runs_of_no_classes():
    [(counts, lengths)] = masks.runs_of([masks.flat_masks(torch.zeros(0, 3, 3), 5, 5, 0.5)])
    assert len(counts) == len(lengths) == 0
    assert masks.masks_from_runs(counts, lengths, [], [], 5, 5) == []


@pytest.mark.parametrize(
    ("counts", "lengths", "message"),
    [
        ([25], [1, 1], "do not match"),
        ([20, 5], [3], "sum to"),
        ([20, 4], [2], "cover 24 pixels"),
    ],
)
def test_bad_runs_are_refused(counts, lengths, message):
    labels = np.arange(len(lengths)) if message != "do not match" else np.arange(1)
    with pytest.raises(ValueError, match=message):
        masks.masks_from_runs(
            np.array(counts), np.array(lengths), labels, np.ones(len(labels)), 5, 5
        )


@pytest.mark.parametrize("mode", ["threshold", "semantic"])
def test_flat_masks_of_makes_same_size_images_together(monkeypatch, mode):
    """Mode threshold: consecutive images of one size in one flat_masks call (up to the
    budget), the same masks as one image at a time; other modes one image at a time."""
    g = torch.Generator().manual_seed(0)
    sizes = [(48, 64)] * 5 + [(30, 20)] * 3 + [(48, 64)] * 4
    logits = [
        torch.randn(int(torch.randint(0, 6, (1,), generator=g)), 7, 7, generator=g) for _ in sizes
    ]
    want = [
        masks.flat_masks(grid, *size, 0.5, mode) for grid, size in zip(logits, sizes, strict=True)
    ]
    calls = []
    real = masks.flat_masks

    def counted(grid, *args):
        calls.append(len(grid))
        return real(grid, *args)

    monkeypatch.setattr(masks, "flat_masks", counted)
    counts = {}
    for budget in (1 << 26, 48 * 64 * 6, 1, None):  # None: one at a time on the CPU
        calls.clear()
        got = list(masks.flat_masks_of(logits, sizes, 0.5, mode, budget=budget))
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b)
        assert sum(calls) == sum(len(grid) for grid in logits)
        counts[budget] = len(calls)
    if mode == "threshold":  # runs of 5, 3 and 4 images of one size
        assert counts[1 << 26] == 3 and 3 < counts[48 * 64 * 6] < counts[1]
        assert counts[1] >= sum(len(grid) > 0 for grid in logits)  # one with masks per call
        assert counts[None] == 12
    else:
        assert set(counts.values()) == {12}
