"""gemlabel on object stores as users run it: real SeaweedFS S3 and fake-gcs-server on
127.0.0.1 (tests/object_stores.py), inputs and outputs on `s3://` and `gs://` (and a local
directory for comparison).

The sequences that lost or doubled labels, or failed, on object stores: a rerun adding
shards to an output whose masks/ was empty (its masks were deleted as orphans), the rerun
that completes a SIGKILLed run, and the tools that only knew local paths. (The killed run
and the labeled shards on a local directory are tests/test_run.py's and
tests/test_training_data.py's.)

Where the process boundary is the point, a command runs in its own process (its own Ray,
whose workers must reach the store with the environment they inherit): `gemlabel run` on
the object stores, the killed run and its resume, and `gemlabel shards`. The runs into a
local directory, the tools that start no Ray (filter, view, report, export coco) and the
refused second writer run in this process. Each backend's labeled output is made once and
read by the tools."""

import contextlib
import io
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from jobs.cli import DEFAULT_GALLERY, DEFAULT_REPORT, main
from pipeline.storage import output
from pipeline.storage.lock import OutputLock
from pipeline.storage.store import Store
from pipeline.storage.tables import read_table
from pipeline.tools.loader import labeled_dataset
from tests.shards import corrupt_huffman_jpeg, write_good_shards, write_shard
from tests.test_run import CLI_SMALL, kill_session

pytestmark = pytest.mark.slow
SERVERS = {"s3": "s3_server", "gs": "gcs_server"}
VOCAB = "cat\ndog\ncar\ntree\nsky\nperson\nbicycle\nboat\n"


@pytest.fixture(scope="module", params=["local", "s3", "gs"])
def place(request, tmp_path_factory):
    """A location on each backend, with the corpus uploaded to it: good shards 0-3, and a
    shard of undecodable images only (its rows are all errors, so no masks)."""
    local = tmp_path_factory.mktemp("corpus")
    write_good_shards(local, n_shards=4, per_shard=6)
    bad = [(f"bad{i}", {"jpg": corrupt_huffman_jpeg()}) for i in range(3)]
    write_shard(local / "broken.tar", bad)
    (local / "vocab.txt").write_text(VOCAB)
    if request.param == "local":
        return str(local)
    base = request.getfixturevalue(SERVERS[request.param]).url("place")
    store = Store(base)
    for path in sorted(local.iterdir()):
        store.write(path.name, path.read_bytes())
    return base


def gemlabel(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`gemlabel ARGS` in its own process (and its own local Ray)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "jobs.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def run_args(place: str, shards: str, out: str) -> list[str]:
    return ["run", f"{place}/{shards}", "--vocab", f"{place}/vocab.txt", "--out", out]


def assert_exactly_once(out: str, expected_images: int) -> dict:
    """Every sample once in images/, the manifest's totals equal the tables' rows."""
    images = read_table(out, output.IMAGES_DIR, ["shard", "key"]).to_pylist()
    masks = read_table(out, output.MASKS_DIR, ["shard", "key", "label_id"]).to_pylist()
    ids = Counter((r["shard"], r["key"]) for r in images)
    assert len(ids) == expected_images and max(ids.values()) == 1
    assert max(Counter(tuple(m.values()) for m in masks).values(), default=1) == 1
    manifest = output.read_manifest(out)
    assert manifest["status"] == "complete"
    assert manifest["totals"]["images"] == len(images)
    assert manifest["totals"]["masks"] == len(masks)
    return manifest


def label(place: str, shards: str, out: str) -> tuple[int, str]:
    """`gemlabel run` of `shards` of `place` into `out`: its exit code and output. On an
    object store in its own process (its Ray's workers reach the store with the environment
    they inherit); on a local directory in this process, on the tests' Ray."""
    args = [*run_args(place, shards, out), *CLI_SMALL.split()]
    if "://" in place:
        done = gemlabel(*args)
        return done.returncode, done.stdout + done.stderr
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        code = main(args)
    return code, printed.getvalue()


@pytest.fixture(scope="module")
def added(place, ray_local):
    """Run 1 labels only the broken shard (error rows: images/ has files, masks/ none; the
    run fails, as nothing could be labeled); run 2 adds good shards 0-2. The output (21
    samples) is what the tools then read."""
    out = f"{place}/out-add"
    code, printed = label(place, "broken.tar", out)
    assert code == 1 and "nothing could be labeled" in printed, printed
    assert read_table(out, output.IMAGES_DIR).num_rows == 3
    masks_after_first = read_table(out, output.MASKS_DIR).num_rows
    code, printed = label(place, "{broken,shard-00000{0..2}}.tar", out)
    assert code == 0, printed
    return {"out": out, "masks_after_first": masks_after_first}


def test_adding_shards_to_an_output_without_masks_keeps_every_mask(added):
    """Every mask the second run wrote is still there, and counted."""
    assert added["masks_after_first"] == 0
    manifest = assert_exactly_once(added["out"], 3 + 18)
    assert manifest["totals"]["masks"] > 0


@pytest.mark.parametrize("place", ["s3", "gs"], indirect=True)  # local: tests/test_run.py
def test_sigkill_then_resume_completes_with_every_row_once(place, tmp_path):
    out = f"{place}/out-kill"
    args = run_args(place, "shard-00000{0..3}.tar", out) + CLI_SMALL.split()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with open(tmp_path / "log.txt", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jobs.cli", *args, "--num-cpus", "2"],
            stdout=log,
            stderr=log,
            env=env,
            start_new_session=True,
        )
    store = Store(out)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if len(store.ls(output.IMAGES_DIR, ".parquet")) >= 2:
                break
            time.sleep(0.1)
    finally:
        kill_session(proc.pid)
        proc.wait()
    assert len(store.ls(output.IMAGES_DIR, ".parquet")) >= 2, (tmp_path / "log.txt").read_text()
    resumed = gemlabel(*args)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "already done" in resumed.stdout
    assert_exactly_once(out, 24)


@pytest.mark.parametrize("place", ["s3", "gs"], indirect=True)  # local: test_training_data
def test_labeled_shards_on_the_store_load_in_the_training_loader(added, place):
    """`gemlabel shards` (Ray workers reading and writing the store) writes its tars to the
    store; the training loader reads every sample back from there."""
    out = added["out"]
    shards = gemlabel("shards", out, "--out", f"{place}/labeled", "--num-cpus", "2")
    assert shards.returncode == 0, shards.stdout + shards.stderr
    labeled = Store(f"{place}/labeled")
    tars = [labeled.display(os.path.basename(p)) for p in labeled.ls("", ".tar")]
    samples = list(labeled_dataset(tars, image_size=32))
    written = json.loads(labeled.read("manifest.json"))["totals"]["written"]["samples"]
    assert tars and len(samples) == written


def test_tools_read_and_write_the_store(added, place, capsys):
    """filter, view, report and export coco on the store's output, their results on the
    store; a second writer is refused with the output's full URL."""
    out = added["out"]
    manifest = assert_exactly_once(out, 21)

    assert main(["filter", out, "--out", f"{place}/filtered", "--max-masks-per-image", "1"]) == 0
    kept = read_table(f"{place}/filtered", output.MASKS_DIR).to_pylist()
    assert 0 < len(kept) <= 18 and max(Counter(m["key"] for m in kept).values()) == 1

    assert main(["view", out]) == 0
    assert Store(out).exists(f"{DEFAULT_GALLERY}/index.html")
    assert not (Path.cwd() / "s3:").exists()
    assert main(["report", out]) == 0 and Store(out).exists(DEFAULT_REPORT)
    store = Store(out)
    tables = (store.path(output.IMAGES_DIR) + "/", store.path(output.MASKS_DIR) + "/")
    found = store.fs.find(store.path())  # every file below the output
    stray = [p for p in found if p.endswith(".parquet") and not p.startswith(tables)]
    assert not stray, f"only the tables end in .parquet: {stray}"
    assert main(["export", "coco", out, f"{place}/coco.json"]) == 0
    data = json.loads(Store(place).read("coco.json"))
    assert len(data["images"]) == manifest["totals"]["ok"]

    capsys.readouterr()
    with OutputLock(out):
        refused = main([*run_args(place, "shard-00000{0..2}.tar", out), *CLI_SMALL.split()])
    assert refused == 2 and f"{Store(out).display()} is being written" in capsys.readouterr().err
