"""From the tables to training: filter, labeled shards, the loader, the report.

The shared labeled output of tests/conftest.py (tiny model, 64 px, two good shards and one
with bad samples) is read; filters are compared with a brute-force pass over the rows.
"""

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow.dataset as pds
import pytest
import torch
from pycocotools import mask as mask_utils

from jobs.cli import main
from pipeline.storage import output
from pipeline.storage.lock import LOCK_DIR
from pipeline.tools.filter import FilterSpec, filter_output
from pipeline.tools.labeled_shards import (
    LABELS_MEMBER,
    SEG_MEMBER,
    decode_png,
    encode_png,
    iter_samples,
    plan_shards,
    png_dtype,
    semantic_map,
    write_labeled_shards,
)
from pipeline.tools.loader import labeled_dataset, labeled_loader
from pipeline.tools.report import FIGURES, write_report
from tests.shards import image_bytes, write_shard
from tests.test_lock import hold_lock

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def labeled(labeled_output, tmp_path_factory):
    """The shared labeled output (`out`: 2 good shards of 5 + a shard with 2 bad samples
    among 2 good ones, tests/conftest.py) and `labels`, its copy filtered so that some ok
    images have no class left."""
    out = labeled_output["out"]
    best = sorted(r["scores"][0] for r in rows(out, "images") if r["scores"])
    labels = str(tmp_path_factory.mktemp("filtered") / "labels")
    filter_output(out, labels, FilterSpec(min_score=best[len(best) // 2]))
    return {**labeled_output, "labels": labels}


def rows(out: str, name: str) -> list[dict]:
    path = Path(out, name)
    if not path.exists():
        return []
    table = pds.dataset(path, format="parquet").to_table().to_pylist()
    return sorted(table, key=lambda r: (r["shard"], r["key"], r.get("label_id", 0)))


def brute_force(images: list[dict], masks: list[dict], spec: FilterSpec):
    """The filter's documented semantics, one row at a time."""
    kept = []
    for m in masks:
        if spec.min_score is not None and not m["score"] >= spec.min_score:
            continue
        if spec.classes is not None and m["label"] not in spec.classes:
            continue
        if spec.min_area is not None and not m["area"] >= spec.min_area:
            continue
        kept.append(m)
    if spec.max_masks_per_image is not None:
        groups = {}
        for m in kept:
            groups.setdefault((m["shard"], m["key"]), []).append(m)
        kept = [
            m
            for group in groups.values()
            for m in sorted(group, key=lambda m: (-m["score"], m["label_id"]))[
                : spec.max_masks_per_image
            ]
        ]
    kept.sort(key=lambda r: (r["shard"], r["key"], r["label_id"]))
    ids = {(m["shard"], m["key"], m["label_id"]) for m in kept}
    new_images = []
    for row in images:
        pairs = [
            (label, score)
            for label, score in zip(row["labels"], row["scores"], strict=True)
            if (row["shard"], row["key"], label) in ids
        ]
        new_images.append({**row, "labels": [p[0] for p in pairs], "scores": [p[1] for p in pairs]})
    return new_images, kept


@pytest.mark.parametrize(
    "spec",
    [
        FilterSpec(),
        FilterSpec(min_score=0.13),
        FilterSpec(classes=("cat", "sky", "boat")),
        FilterSpec(min_area=500),
        FilterSpec(max_masks_per_image=1),
        FilterSpec(
            min_score=0.127,
            classes=("cat", "dog", "tree", "sky"),
            min_area=10,
            max_masks_per_image=2,
        ),
    ],
)
def test_filter_matches_brute_force(labeled, tmp_path, spec):
    out, dest = labeled["out"], str(tmp_path / "filtered")
    manifest = filter_output(out, dest, spec)
    images, masks = brute_force(rows(out, "images"), rows(out, "masks"), spec)
    assert rows(dest, "images") == images
    assert rows(dest, "masks") == masks
    assert manifest["filter"]["max_masks_per_image"] == spec.max_masks_per_image
    assert manifest["totals"]["images"] == len(images) and manifest["totals"]["masks"] == len(masks)
    assert all(s["complete"] for s in manifest["shards"].values())
    names = sorted(p.name for p in Path(out, "images").glob("*.parquet"))
    assert sorted(p.name for p in Path(dest, "images").glob("*.parquet")) == names
    assert not list(Path(dest).rglob("*.tmp"))


def test_filter_cli_resume_and_mismatch(labeled, tmp_path, capsys):
    out, dest = labeled["out"], tmp_path / "filtered"
    args = ["filter", out, "--out", str(dest), "--classes", "cat,dog", "--max-masks-per-image", "1"]
    assert main(args) == 0
    first = rows(str(dest), "images")
    victim = sorted(Path(dest, "images").glob("*.parquet"))[0]
    victim.unlink()  # an interrupted filter: one file missing
    assert main(args) == 0
    assert rows(str(dest), "images") == first
    assert main(["filter", out, "--out", str(dest), "--min-score", "0.2"]) == 2
    assert main(["filter", out, "--out", str(tmp_path / "x"), "--classes", "unicorn"]) == 2
    assert "unicorn" in capsys.readouterr().err


def test_filter_and_shards_refuse_a_destination_another_writer_holds(labeled, tmp_path, capsys):
    for command in (["filter", labeled["out"]], ["shards", labeled["labels"]]):
        dest = str(tmp_path / command[0])
        holder = hold_lock(dest)
        try:
            assert main([*command, "--out", dest]) == 2
        finally:
            holder.communicate("")
        assert "being written by another gemlabel run" in capsys.readouterr().err
        assert os.listdir(dest) == [LOCK_DIR]  # nothing written but the (released) claim
        assert main([*command, "--out", dest]) == 0  # once released


def read_tar(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    return [(key, dict(members)) for key, members in iter_samples(str(path))]


def source_members(shards: list[str]) -> dict[tuple[str, str], dict[str, bytes]]:
    return {(s, k): dict(m) for s in shards for k, m in iter_samples(s)}


def check_labeled_shards(labeled, dest: Path, expect_errors: bool, expect_unlabeled: bool):
    """Every written sample: original members intact, JSON and PNG equal to the tables."""
    out = labeled["labels"]
    images = {(r["shard"], r["key"]): r for r in rows(out, "images")}
    masks = {}
    for m in rows(out, "masks"):
        masks.setdefault((m["shard"], m["key"]), []).append(m)
    sources = source_members(labeled["shards"])
    seen = Counter()
    for tar in sorted(dest.glob("*.tar")):
        for key, members in read_tar(tar):
            info = json.loads(members[LABELS_MEMBER])
            ident = (info["shard"], key)
            seen[ident] += 1
            row = images[ident]
            original = sources[ident]
            assert {k: v for k, v in members.items() if k not in (LABELS_MEMBER, SEG_MEMBER)} == (
                original
            )
            assert info["status"] == row["status"] and info["error"] == row["error"]
            if row["status"] != "ok":
                assert SEG_MEMBER not in members
                continue
            expected = {m["label_id"]: m for m in masks.get(ident, [])}
            assert [a["label_id"] for a in info["annotations"]] == row["labels"]
            seg = decode_png(members[SEG_MEMBER])
            assert seg.shape == (row["height"], row["width"]) and seg.dtype == np.uint8
            covered = np.zeros(seg.shape, dtype=bool)
            for ann in info["annotations"]:
                m = expected[ann["label_id"]]
                assert ann["segmentation"] == m["mask"] and ann["area"] == m["area"]
                assert ann["score"] == pytest.approx(m["score"]) and ann["label"] == m["label"]
                binary = mask_utils.decode(m["mask"]).astype(bool)
                # a pixel of a mask shows that class or another class covering it
                assert np.isin(seg[binary], [a["label_id"] + 1 for a in info["annotations"]]).all()
                covered |= binary
            assert (seg[~covered] == 0).all() and (seg[covered] > 0).all()
            best = max(
                info["annotations"], key=lambda a: (a["score"], -a["label_id"]), default=None
            )
            if best is not None:
                best_mask = mask_utils.decode(expected[best["label_id"]]["mask"]).astype(bool)
                assert (seg[best_mask] == best["label_id"] + 1).all()
    kinds = Counter()
    for ident, row in images.items():
        kind = "errors" if row["status"] != "ok" else ("labeled" if row["labels"] else "unlabeled")
        kinds[kind] += 1
        wanted = (
            kind == "labeled"
            or (kind == "unlabeled" and expect_unlabeled)
            or (kind == "errors" and expect_errors and ident in sources)
        )
        assert seen[ident] == (1 if wanted else 0), (ident, kind)
    return kinds, seen


def test_labeled_shards_round_trip(labeled, tmp_path):
    dest = tmp_path / "shards"
    manifest = write_labeled_shards(labeled["labels"], str(dest), include_errors=True)
    kinds, seen = check_labeled_shards(labeled, dest, expect_errors=True, expect_unlabeled=False)
    assert kinds["labeled"] and kinds["unlabeled"] and kinds["errors"] == 2  # the data covers all
    totals = manifest["totals"]
    assert totals["tables"]["labeled"] == kinds["labeled"]
    assert totals["tables"]["unlabeled"] == kinds["unlabeled"]
    assert totals["tables"]["errors"] == kinds["errors"]
    assert totals["written"]["samples"] == sum(seen.values())
    assert totals["written"]["missing"] == 0 and manifest["status"] == "complete"
    assert len(list(dest.glob("*.tar"))) == 3  # source shard boundaries kept
    assert manifest["id_map"]["background"] == 0 and manifest["id_map"]["names"]["1"] == "cat"
    for tar in dest.glob("*.tar"):  # a sample's members stay together, labels last
        names = [m.name.split(".", 1) for m in tarfile.open(tar)]
        for key in {k for k, _ in names}:
            exts = [e for k, e in names if k == key]
            assert exts[len(exts) - len(set(exts) & {LABELS_MEMBER, SEG_MEMBER}) :] == [
                e for e in (LABELS_MEMBER, SEG_MEMBER) if e in exts
            ]


def test_labeled_shards_resized_with_unlabeled(labeled, tmp_path):
    dest = tmp_path / "shards"
    manifest = write_labeled_shards(
        labeled["labels"], str(dest), samples_per_shard=3, include_unlabeled=True
    )
    kinds, seen = check_labeled_shards(labeled, dest, expect_errors=False, expect_unlabeled=True)
    n = kinds["labeled"] + kinds["unlabeled"]
    assert sum(seen.values()) == n and len(list(dest.glob("*.tar"))) == -(-n // 3)
    assert [s["samples"] for s in manifest["shards"].values()][:-1] == [3] * (n // 3 - (n % 3 == 0))


@pytest.mark.parametrize("per_shard", [None, 3])
def test_labeled_shards_plan_holds_ranges_not_keys(labeled, per_shard):
    """The plan (what the driver holds) is counts and file names: each output shard's parts
    are ranges of its shards' selected samples (key order), covering each shard's once and
    in order; its files are exactly the images files holding those shards and their masks
    twins."""
    out = labeled["labels"]
    jobs, counts = plan_shards(out, None, include_unlabeled=True, samples_per_shard=per_shard)
    files_of: dict[str, set[str]] = {}
    for path in sorted(Path(out, "images").glob("*.parquet")):
        for shard in set(pds.dataset(path).to_table(columns=["shard"])["shard"].to_pylist()):
            files_of.setdefault(shard, set()).add(path.name)
    selected = Counter(
        r["shard"] for r in rows(out, "images") if r["status"] == "ok"
    )  # labeled and unlabeled
    covered: dict[str, list[tuple[int, int]]] = {}
    for job in jobs:
        parts, files = json.loads(job["parts"]), json.loads(job["files"])
        assert "key" not in job["parts"] and all(len(p) == 4 for p in parts)
        if per_shard:
            assert sum(stop - first for _, _, first, stop in parts) <= per_shard
        shards = {shard for shard, _, _, _ in parts}
        assert set(files["images"]) == set().union(*(files_of[s] for s in shards))
        twins = {p.name for p in Path(out, "masks").glob("*.parquet")} & set(files["images"])
        assert set(files["masks"]) == twins
        for shard, _, first, stop in parts:
            covered.setdefault(shard, []).append((first, stop))
    for shard, ranges in covered.items():
        assert [r[0] for r in ranges] == [0] + [r[1] for r in ranges[:-1]]  # contiguous
        assert ranges[-1][1] == selected[shard]
    assert set(covered) == set(selected)
    assert counts["labeled_selected"] + counts["unlabeled_selected"] == sum(selected.values())


def test_labeled_shards_kill_and_rerun(labeled, tmp_path):
    """SIGKILL `gemlabel shards` once it has written a shard, rerun: every sample once. One
    tar per sample; a kill that lands after the last tar is tried again (up to 3 times)."""
    from tests.test_run import kill_session

    dest = tmp_path / "shards"
    total = sum(r["status"] == "ok" for r in rows(labeled["labels"], "images"))
    cli = Path(sys.executable).with_name("gemlabel")
    cmd = [str(cli), "shards", labeled["labels"], "--out", str(dest), "--samples-per-shard", "1"]
    cmd += ["--num-cpus", "1", "--include-unlabeled"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    for _ in range(3):
        shutil.rmtree(dest, ignore_errors=True)
        with open(tmp_path / "log.txt", "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, start_new_session=True)
        try:
            deadline = time.time() + 240
            while time.time() < deadline and proc.poll() is None and not list(dest.glob("*.tar")):
                time.sleep(0.05)
        finally:
            kill_session(proc.pid)
            proc.wait()
        written = len(list(dest.glob("*.tar")))
        if written < total:
            break
    assert 1 <= written < total, "killed mid-run"
    assert main(cmd[1:]) == 0
    manifest = output.read_manifest(str(dest))
    assert manifest["skipped_shards"] >= written
    check_labeled_shards(labeled, dest, expect_errors=False, expect_unlabeled=True)
    assert not list(dest.rglob("*.tmp"))


def test_semantic_map_ids_and_16_bit():
    a = mask_utils.encode(np.asfortranarray(np.pad(np.ones((2, 2), np.uint8), ((0, 2), (0, 2)))))
    b = mask_utils.encode(np.asfortranarray(np.pad(np.ones((2, 2), np.uint8), ((1, 1), (1, 1)))))
    anns = [
        {"label_id": 300, "score": 0.2, "segmentation": {**a, "counts": a["counts"].decode()}},
        {"label_id": 7, "score": 0.5, "segmentation": {**b, "counts": b["counts"].decode()}},
    ]
    seg = semantic_map(anns, 4, 4, png_dtype(1000))
    assert seg.dtype == np.uint16 and seg[0, 0] == 301 and seg[1, 1] == 8 and seg[3, 3] == 0
    assert (decode_png(encode_png(seg)) == seg).all()
    assert png_dtype(255) is np.uint8 and png_dtype(256) is np.uint16


def test_loader_shapes_and_alignment(labeled, tmp_path):
    dest = tmp_path / "shards"
    write_labeled_shards(labeled["labels"], str(dest), include_errors=True)
    urls = sorted(str(p) for p in dest.glob("*.tar"))
    raw = {k: m for u in urls for k, m in read_tar(Path(u))}
    ok = [k for k, m in raw.items() if json.loads(m[LABELS_MEMBER])["status"] == "ok"]

    batches = list(labeled_loader(urls, batch_size=4, image_size=(24, 32)))
    images = torch.cat([b[0] for b in batches])
    targets = torch.cat([b[1] for b in batches])
    assert images.shape == (len(ok), 3, 24, 32) and images.dtype == torch.float32
    assert targets.shape == (len(ok), 24, 32) and targets.dtype == torch.int64
    assert 0 <= images.min() and images.max() <= 1 and targets.max() <= 8

    masks_ds = list(labeled_dataset(urls, image_size=16, target="masks", class_ids=[0, 3, 5]))
    assert len(masks_ds) == len(ok)
    for (image, semantic), (image2, masks), key in zip(
        labeled_dataset(urls, image_size=16), masks_ds, ok, strict=True
    ):
        assert torch.equal(image, image2) and masks.shape == (3, 16, 16)
        info = json.loads(raw[key][LABELS_MEMBER])
        h, w = info["height"], info["width"]
        # aligned: the target is the full-resolution map sampled at the pixel centres
        rows_ = ((np.arange(16) + 0.5) * h / 16).astype(int)
        cols = ((np.arange(16) + 0.5) * w / 16).astype(int)
        full = decode_png(raw[key][SEG_MEMBER])
        assert torch.equal(semantic, torch.from_numpy(full[np.ix_(rows_, cols)].astype(np.int64)))
        for channel, class_id in enumerate([0, 3, 5]):
            ann = [a for a in info["annotations"] if a["label_id"] == class_id]
            expected = np.zeros((16, 16), np.float32)
            if ann:
                expected = mask_utils.decode(ann[0]["segmentation"])[np.ix_(rows_, cols)]
            assert torch.equal(masks[channel], torch.from_numpy(expected.astype(np.float32)))


class _Figures(HTMLParser):
    def __init__(self):
        super().__init__()
        self.figures, self.svgs, self.images, self.links, self.stack = {}, 0, [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "figure":
            self.stack.append(attrs["id"])
            self.figures[attrs["id"]] = {"rects": 0}
        if tag == "rect" and self.stack:
            self.figures[self.stack[-1]]["rects"] += 1
        if tag == "svg":
            self.svgs += 1
        if tag == "img":
            self.images.append(attrs["src"])
        for name in ("href", "src"):
            if name in attrs:
                self.links.append(attrs[name])

    def handle_endtag(self, tag):
        if tag == "figure":
            self.stack.pop()


def test_report_renders_figures(labeled, tmp_path, capsys):
    path = tmp_path / "report.html"
    assert (
        main(["report", labeled["labels"], "--html", str(path), "--source", *labeled["shards"]])
        == 0
    )
    parser = _Figures()
    text = path.read_text()
    parser.feed(text)
    assert set(FIGURES) <= set(parser.figures)
    for fid in ("status", "masks-per-image", "top-classes", "long-tail", "scores", "mask-area"):
        assert parser.figures[fid]["rects"] > 0, fid
    assert parser.figures["errors"]["rects"] == 2  # two error kinds: decode, read
    assert parser.images and all(s.startswith("data:image/jpeg;base64,") for s in parser.images)
    assert all(link.startswith("data:") for link in parser.links)  # self-contained
    masks = rows(labeled["labels"], "masks")
    assert f"{len(masks)} masks" in text
    assert "decode: cannot identify image file" in text and "read: no image member" in text

    stats = write_report(labeled["labels"], str(tmp_path / "plain.html"))
    assert stats["images"] == 14 and sum(stats["errors"].values()) == 2
    assert sum(stats["classes"].values()) == len(masks)
    assert "pass the source shards" in (tmp_path / "plain.html").read_text()


def test_report_loses_only_the_pictures_whose_source_changed(labeled, tmp_path):
    """Sources with the same keys but pictures of another size: each example is a listed
    problem instead of an overlay; the report is still written."""
    changed = []
    for shard in labeled["shards"]:
        samples = [(key, {"jpg": image_bytes(20, 20, seed=9)}) for key, _ in iter_samples(shard)]
        changed.append(write_shard(tmp_path / Path(shard).name, samples))
    path = tmp_path / "report.html"
    write_report(labeled["labels"], str(path), changed)
    text = path.read_text()
    assert "data:image/jpeg;base64," not in text
    assert "ValueError: the source image is 20x20, its mask " in text
