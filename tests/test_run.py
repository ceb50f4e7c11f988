"""End to end on a real local Ray: tables, bad input, resume after SIGKILL, killed actors,
determinism, the error budget."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.dataset as pds
import pytest
from pycocotools import mask as mask_utils

from jobs.cli import main
from pipeline.config import RunConfig
from pipeline.run import run
from pipeline.storage import output
from tests.shards import payload_path, write_bad_corpus, write_good_shards

pytestmark = pytest.mark.slow

SMALL = dict(  # tiny model, small batches: many files and tasks from few images
    model="gemlabel-tiny",
    pretrained="random",
    image_size=32,
    top_k=3,
    batch_size=4,
    decode_batch_size=4,
    rows_per_file=3,
)
TINY = "--model gemlabel-tiny --pretrained random"  # seeded random weights, asked for
CLI_SIZES = "--image-size 32 --top-k 3 --batch-size 4 --decode-batch-size 4 --rows-per-file 3"
CLI_SMALL = f"{TINY} {CLI_SIZES}"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    good = write_good_shards(root / "good", n_shards=3, per_shard=6)
    bad, expected = write_bad_corpus(root / "bad")
    vocab = root / "vocab.txt"
    vocab.write_text("cat\ndog\ncar\ntree\nsky\nperson\nbicycle\nboat\n")
    return {"root": root, "good": good, "bad": bad, "expected": expected, "vocab": str(vocab)}


@pytest.fixture(scope="module")
def reference(ray_local, corpus, tmp_path_factory):
    """An uninterrupted run over the good shards and the bad-input corpus."""
    out = str(tmp_path_factory.mktemp("reference") / "out")
    config = RunConfig(
        inputs=corpus["good"] + corpus["bad"], vocab=corpus["vocab"], out=out, **SMALL
    )
    return config, run(config)


def table(out: str, name: str) -> list[dict]:
    path = Path(out, name)
    if not path.exists():
        return []
    rows = pds.dataset(path, format="parquet").to_table().to_pylist()
    return sorted(rows, key=lambda r: (r["shard"], r["key"], r.get("label_id", 0)))


def identities(rows: list[dict]) -> list[tuple[str, str]]:
    return [(r["shard"], r["key"]) for r in rows]


def assert_same_results(out: str, reference_out: str, shards: list[str]) -> None:
    """Same rows as the reference for `shards`: identities, status, labels and masks exact;
    float scores to 1e-5 (an interrupted run batches images differently, and batched
    float32 kernels may differ in the last bit)."""
    for name in ("images", "masks"):
        got = table(out, name)
        expected = [r for r in table(reference_out, name) if r["shard"] in set(shards)]
        assert len(got) == len(expected)
        for a, b in zip(got, expected, strict=True):
            scores = ("scores", "score")
            assert {k: v for k, v in a.items() if k not in scores} == {
                k: v for k, v in b.items() if k not in scores
            }
            for key in set(scores) & set(a):
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7)


def test_one_row_per_sample_masks_and_manifest(reference, corpus):
    config, summary = reference
    images, masks = table(config.out, "images"), table(config.out, "masks")
    expected = {(s, k or ""): e for (s, k), e in corpus["expected"].items()}
    for i, shard in enumerate(corpus["good"]):
        expected.update({(shard, f"{n:06d}"): None for n in range(6 * i, 6 * i + 6)})
    assert sorted(identities(images)) == sorted(expected)  # exactly once each
    for row in images:
        expect = expected[(row["shard"], row["key"])]
        if expect is None or expect.stage == "ok":
            assert row["status"] == "ok" and row["error"] is None and len(row["labels"]) == 3
            if expect is not None:
                assert (row["width"], row["height"]) == expect.size
        else:
            assert row["status"] == "error" and row["labels"] == []
            assert row["error"].startswith(f"{expect.stage}: ") and expect.message in row["error"]
    assert not payload_path(corpus["bad"][0].rsplit("/", 1)[0]).exists()

    ok = {(r["shard"], r["key"]): r for r in images if r["status"] == "ok"}
    by_image = {}
    for m in masks:
        by_image.setdefault((m["shard"], m["key"]), []).append(m)
        image = ok[(m["shard"], m["key"])]
        decoded = mask_utils.decode(m["mask"])
        assert decoded.shape == (image["height"], image["width"]) and decoded.sum() == m["area"]
        assert m["area"] > 0 and m["label_id"] in image["labels"]  # empty masks: no row
    # every kept class has its mask row, but for those whose mask came out empty
    kept = sum(len(r["labels"]) for r in ok.values())
    assert kept == len(masks) + summary.dropped_empty
    assert output.read_manifest(config.out)["run"]["dropped_empty"] == summary.dropped_empty

    manifest = output.read_manifest(config.out)
    assert manifest["status"] == "complete" and summary.exit_code == 0
    assert (
        manifest["config"]["pretrained"] == "random" and manifest["weights"]["source"] == "random"
    )
    assert "weights: seeded random (--pretrained random)" in summary.format()
    errors = sum(r["status"] == "error" for r in images)
    assert manifest["totals"] == {
        "images": len(images),
        "ok": len(images) - errors,
        "errors": errors,
        "masks": len(masks),
    }
    assert (summary.ok, summary.errors, summary.masks) == (len(ok), errors, len(masks))
    shards = manifest["shards"]
    assert all(s["complete"] for s in shards.values()) and len(shards) == 6
    assert sorted(summary.damaged_shards) == sorted(corpus["bad"][1:])
    assert shards[corpus["bad"][2]]["damage"].startswith("read: cannot open shard")
    assert manifest["config"]["vocabulary"]["classes"] == 8
    assert {"ray", "torch", "open_clip_torch", "gemlabel"} <= set(manifest["versions"])
    text = summary.format()
    assert f"{len(images)} images ({len(ok)} ok, {errors} error)" in text
    assert "images/s" in text and config.out in text and "missing-000002.tar" in text


def test_rerun_skips_finished_work(reference):
    config, _ = reference
    before = {p: p.stat().st_mtime_ns for p in Path(config.out).rglob("*.parquet")}
    summary = run(config)
    assert summary.status == "complete" and summary.images == 0
    assert summary.skipped == len(table(config.out, "images"))
    assert {p: p.stat().st_mtime_ns for p in Path(config.out).rglob("*.parquet")} == before


def test_same_inputs_same_rows(reference, tmp_path):
    """Same rows again, also with one batch at a time in the actor (the reference: two)."""
    config, _ = reference
    assert config.actor_concurrency == 2
    again = RunConfig(**{**config.__dict__, "out": str(tmp_path / "again"), "actor_concurrency": 1})
    run(again)
    for name in ("images", "masks"):
        assert table(again.out, name) == table(config.out, name)
    first, second = output.read_manifest(config.out), output.read_manifest(again.out)
    for manifest in (first, second):
        del manifest["timings"]
    assert first["shards"] == second["shards"] and first["config"] == second["config"]


def test_masks_made_on_the_actor_match_the_write_stage(reference, corpus, tmp_path):
    """--mask-stage actor writes exactly the rows the CPU write stage writes."""
    config, _ = reference
    actor = RunConfig(**{**config.__dict__, "out": str(tmp_path / "actor"), "mask_stage": "actor"})
    summary = run(actor)
    assert summary.status == "complete" and summary.masks > 0
    assert_same_results(actor.out, config.out, corpus["good"] + corpus["bad"])


@pytest.mark.parametrize("jpeg_stage", ["decoder", "actor"])
def test_resize_and_masks_on_the_actor(reference, tmp_path, jpeg_stage):
    """Resize and masks on the actor (--resize-stage/--mask-stage actor), and the plain
    JPEGs decoded there too (--jpeg-stage actor): the same rows, status and errors
    (the bad-input corpus included); resized pixels are within one level of PIL's, so
    labels agree."""
    config, _ = reference
    stages = {"mask_stage": "actor", "resize_stage": "actor", "jpeg_stage": jpeg_stage}
    actor = RunConfig(**{**config.__dict__, "out": str(tmp_path / "actor"), **stages})
    assert run(actor).status == "complete"
    got, want = table(actor.out, "images"), table(config.out, "images")
    fields = ("shard", "key", "status", "error", "width", "height")
    assert [[r[f] for f in fields] for r in got] == [[r[f] for f in fields] for r in want]
    ok = [(a["labels"], b["labels"]) for a, b in zip(got, want, strict=True) if a["status"] == "ok"]
    assert sum(a == b for a, b in ok) >= 0.9 * len(ok)


@pytest.mark.parametrize("model", ["gemlabel-tiny", "gemlabel-toy"])
def test_naclip_with_pamr_from_the_command_line(ray_local, corpus, tmp_path, capsys, model):
    """`--method naclip --refine pamr` end to end: one mask per kept class at the original
    size, the method, its options and the refinement in the manifest, the same rows with
    masks made on the actor, and a resume with another --refine refused."""
    shards = corpus["good"][:2]
    out = str(tmp_path / "out")
    weights = TINY.split() if model == "gemlabel-tiny" else ["--model", model]
    args = ["run", *shards, "--vocab", corpus["vocab"], *weights, *CLI_SIZES.split()]
    args += ["--method", "naclip", "--refine", "pamr"]
    assert main([*args, "--out", out]) == 0
    images, masks = table(out, "images"), table(out, "masks")
    assert len(images) == 12 and all(r["status"] == "ok" for r in images)
    dropped = output.read_manifest(out)["run"]["dropped_empty"]  # empty masks: no row
    assert len(masks) + dropped == 3 * len(images) and all(m["area"] > 0 for m in masks)
    sizes = {(r["shard"], r["key"]): (r["height"], r["width"]) for r in images}
    for m in masks:
        decoded = mask_utils.decode(m["mask"])
        assert decoded.shape == sizes[(m["shard"], m["key"])] and decoded.sum() == m["area"]
    assert sum(m["area"] > 0 for m in masks) > len(masks) // 2
    config = output.read_manifest(out)["config"]
    assert (config["model"], config["method"], config["refine"]) == (model, "naclip", "pamr")
    assert config["gem_options"] == {} and config["image_size"] == [32, 32]

    actor = str(tmp_path / "actor")
    assert main([*args, "--out", actor, "--mask-stage", "actor"]) == 0
    assert_same_results(actor, out, shards)

    capsys.readouterr()
    assert main([*args[:-2], "--out", out]) == 2  # --refine none: not a resume of this output
    err = capsys.readouterr().err
    assert "different configuration" in err and "refine" in err
    assert output.read_manifest(out)["config"]["refine"] == "pamr"


def test_a_run_that_labels_nothing_fails(ray_local, corpus, tmp_path, capsys):
    """The only input does not exist: exit 1 and status "failed" (not "complete"), saying
    that nothing could be labeled, with the error kind cut between words, not inside one."""
    out = tmp_path / "out"
    missing = str(tmp_path / "no-such-directory" / "missing-shard-000000.tar")
    args = ["run", missing, "--vocab", corpus["vocab"], "--out", str(out), *CLI_SMALL.split()]
    assert main(args) == 1
    printed = capsys.readouterr().out
    assert printed.startswith("gemlabel run failed: 1 images (0 ok, 1 error)"), printed
    assert "nothing could be labeled: all 1 images of the inputs are error rows" in printed
    (error,) = [r["error"] for r in table(str(out), "images")]
    shown = printed.split("most common errors:\n")[1].splitlines()[0].split(" x ", 1)[1]
    assert error.startswith(shown.removesuffix("…"))
    assert shown == error or not error[len(shown) - 1].isalnum(), (shown, error)
    manifest = output.read_manifest(str(out))
    assert manifest["status"] == "failed" and "nothing could be labeled" in manifest["message"]


def test_error_budget_stops_the_run(ray_local, corpus, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["run", *corpus["bad"], "--vocab", corpus["vocab"], "--out", str(out)]
    args += CLI_SMALL.split() + ["--max-error-rate", "0.1", "--min-error-samples", "4"]
    assert main(args) == 3
    printed = capsys.readouterr().out
    assert "error budget exceeded" in printed and "--max-error-rate 0.1" in printed
    manifest = output.read_manifest(str(out))
    assert manifest["status"] == "aborted" and "error budget" in manifest["message"]
    keys = identities(table(str(out), "images"))
    assert keys and len(keys) == len(set(keys))


def kill_session(sid: int) -> None:
    """SIGKILL every process of session `sid` (the CLI, its embedded Ray, Ray's workers)."""
    for _ in range(50):
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":  # zombies are dead already
                pids.append(int(stat.parent.name))
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    raise AssertionError(f"processes of session {sid} survive SIGKILL")


def wait_for_files(out: Path, n: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Wait until `out` has its manifest (n=0) or `n` images files."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        files = len(list((out / "images").glob("*.parquet")))
        if files >= n and (n or (out / "manifest.json").exists()):
            return
        time.sleep(0.05)
    missing = f"{n} images files" if n else "manifest"
    raise AssertionError(f"no {missing} in {timeout} s (exit code {proc.poll()})")


def test_sigkill_and_resume(ray_local, corpus, tmp_path):
    """Kill the whole job (driver, embedded Ray, workers) at three points (manifest written,
    no output yet; first output; more output), then finish it: every key once, rows and
    masks equal to the uninterrupted run."""
    # more work than the shared corpus, so that a kill lands well before the end
    shards = write_good_shards(tmp_path / "shards", n_shards=6, per_shard=8)
    config = RunConfig(inputs=shards, vocab=corpus["vocab"], out=str(tmp_path / "ref"), **SMALL)
    run(config)
    out = tmp_path / "out"
    cli = Path(sys.executable).with_name("gemlabel")
    cmd = [str(cli), "run", *shards, "--vocab", corpus["vocab"], "--out", str(out)]
    cmd += CLI_SMALL.split() + ["--num-cpus", "2"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray
    seen = 0
    for extra in (0, 1, 2):
        with open(tmp_path / "log.txt", "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, start_new_session=True)
        try:
            wait_for_files(out, seen + extra, proc)
        finally:
            kill_session(proc.pid)
            proc.wait()
        seen = len(list((out / "images").glob("*.parquet")))
        if seen:
            rows = identities(table(str(out), "images"))
            assert len(rows) == len(set(rows)) and len(rows) < 48, "killed mid-run"
    final = run(RunConfig(**{**config.__dict__, "out": str(out)}))
    assert final.status == "complete" and final.skipped > 0
    assert_same_results(str(out), config.out, shards)
    assert not list(out.rglob("*.tmp"))


def labeler_pids() -> list[int]:
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().decode(errors="replace")
        except OSError:
            continue
        if text.startswith("ray::MapWorker") and "Labeler" in text:
            pids.append(int(cmdline.parent.name))
    return pids


def test_killed_actor_loses_and_doubles_nothing(reference, corpus, tmp_path):
    """A labeling actor SIGKILLed mid-run: every row exactly once. Mid-run, the watcher also
    leaves what a write task killed mid-write leaves (a temp file, a masks file whose images
    twin never landed): the run removes them before it ends."""
    config, _ = reference
    out = tmp_path / "out"
    killed, leftovers = [], []

    def kill_labeler_once_output_exists():
        deadline = time.time() + 240
        while time.time() < deadline and not killed:
            pids = labeler_pids()
            files = list((out / "images").glob("*.parquet"))
            if pids and files:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
                leftovers.append(out / "images" / ".0123.parquet.abc.tmp")
                leftovers[-1].write_bytes(b"partial")
                (out / "masks").mkdir(exist_ok=True)
                leftovers.append(out / "masks" / "0123.parquet")
                leftovers[-1].write_bytes(files[0].read_bytes())
            time.sleep(0.02)

    watcher = threading.Thread(target=kill_labeler_once_output_exists, daemon=True)
    watcher.start()
    summary = run(RunConfig(**{**config.__dict__, "inputs": corpus["good"], "out": str(out)}))
    watcher.join()
    assert killed, "the Labeler actor was not killed during the run"
    assert summary.status == "complete"
    assert_same_results(str(out), config.out, corpus["good"])
    assert leftovers and not any(path.exists() for path in leftovers)


def test_a_stream_without_progress_is_ended_by_the_watchdog(corpus, tmp_path):
    """A source that accepts the connection and never answers: the read task waits forever.
    The run ends after --stall-timeout with exit 1 and Ray's resources in the message,
    instead of hanging; the output stays resumable (manifest: stalled)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    accepted = []
    threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
    url = f"http://127.0.0.1:{server.getsockname()[1]}/shard-000000.tar"
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "jobs.cli", "run", url, "--vocab", corpus["vocab"]]
    cmd += ["--out", str(out), *CLI_SMALL.split(), "--num-cpus", "2", "--stall-timeout", "8"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    finally:
        server.close()
    assert done.returncode == 1, done.stdout + done.stderr
    assert "gemlabel run stalled" in done.stdout and "no progress for" in done.stdout
    assert "--stall-timeout 8" in done.stdout and "CPU" in done.stdout  # Ray's resources
    manifest = output.read_manifest(str(out))
    assert manifest["status"] == "stalled" and "no progress" in manifest["message"]


def session_processes(sid: int) -> list[str]:
    """The live processes of session `sid`, as `pid name`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name, fields = text[text.index("(") + 1 : text.rindex(")")], text.rsplit(")", 1)[1].split()
        if int(fields[3]) == sid and fields[0] != "Z":
            found.append(f"{stat.parent.name} {name}")
    return found


def test_a_killed_driver_leaves_no_ray_process_behind(corpus, tmp_path):
    """SIGKILL of the `gemlabel run` process alone (as an OOM killer or a lost pod would):
    its embedded Ray, the labeling actors, read and write tasks all end with it."""
    shards = write_good_shards(tmp_path / "shards", n_shards=6, per_shard=8)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "jobs.cli", "run", *shards, "--vocab", corpus["vocab"]]
    cmd += ["--out", str(out), *CLI_SMALL.split(), "--num-cpus", "2", "--image-size", "256"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with open(tmp_path / "log.txt", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, start_new_session=True)
    try:
        wait_for_files(out, 1, proc)
        assert any("ray::" in p for p in session_processes(proc.pid))  # workers are running
        proc.kill()  # the driver only
        proc.wait()
        deadline = time.time() + 180
        while session_processes(proc.pid) and time.time() < deadline:
            time.sleep(1)
        assert session_processes(proc.pid) == []
    finally:
        kill_session(proc.pid)


def test_a_run_whose_lock_is_taken_over_stops_writing(corpus, tmp_path):
    """Another run takes the lock over mid-run (as it would from a host that found this
    one's heartbeat stale): at its next heartbeat the run stops the stream, writes nothing
    more (not even its manifest) and exits 1 naming the new holder."""
    shards = write_good_shards(tmp_path / "shards", n_shards=6, per_shard=8)
    out = tmp_path / "out"
    args = ["run", *shards, "--vocab", corpus["vocab"], "--out", str(out), *CLI_SMALL.split()]
    args += ["--num-cpus", "2", "--image-size", "256"]
    code = (
        "import sys; from pipeline.storage import lock; lock.HEARTBEAT_S = 0.5\n"
        f"from jobs.cli import main; sys.exit(main({args!r}))"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with open(tmp_path / "log.txt", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdout=subprocess.PIPE,
            stderr=log,
            env=env,
            start_new_session=True,
        )
    try:
        wait_for_files(out, 1, proc)
        [claim] = sorted((out / "_lock").iterdir())
        newer = claim.with_name(f"{int(claim.stem) + 1:012d}.json")
        newer.write_text(
            json.dumps({"id": "y", "host": "elsewhere", "pid": 4242, "heartbeat": time.time()})
        )
        stdout, _ = proc.communicate(timeout=120)
    finally:
        kill_session(proc.pid)
    assert proc.returncode == 1, stdout
    assert b"gemlabel run lock lost" in stdout and b"host elsewhere, pid 4242" in stdout
    assert output.read_manifest(str(out))["status"] == "incomplete"  # not written again
    assert json.loads(newer.read_text())["id"] == "y"  # the new holder's claim untouched
