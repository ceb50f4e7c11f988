"""The commands that read a finished output (view, report, export coco, filter, status) run
in a process that loads no torch, open_clip, Ray or gem: their tools decode images with PIL,
read shards without Ray Data and know the bundled models from gem's folder."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

import gem
from pipeline.stages.write import write_batch
from pipeline.storage import output
from pipeline.weights import bundled_models
from tests.shards import image_bytes, write_shard
from tests.test_write import column

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "open_clip", "ray", "gem", "webdataset")
TOOLS = (
    "pipeline.tools.report",
    "pipeline.tools.gallery",
    "pipeline.tools.coco",
    "pipeline.tools.filter",
    "pipeline.tools.labeled_shards",
    "pipeline.tools.progress",
    "pipeline.prompts.vocab",
)

# imports `modules`, then runs each argv through jobs.cli.main, in one fresh interpreter;
# prints the exit codes, then which of HEAVY were imported
_PROBE = """
import importlib, json, sys
modules, argvs, heavy = (json.loads(a) for a in sys.argv[1:])
for name in modules:
    importlib.import_module(name)
import jobs.cli
codes = [jobs.cli.main(argv) for argv in argvs]
print(json.dumps([codes, [m for m in heavy if m in sys.modules]]))
"""


def _fresh(modules: list[str], argvs: list[list[str]]) -> tuple[list[int], list[str]]:
    """The exit codes of `argvs` run by main in a fresh process that first imports
    `modules`, and the HEAVY modules that process imported."""
    args = [json.dumps(a) for a in (modules, argvs, HEAVY)]
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    codes, heavy = json.loads(done.stdout.splitlines()[-1])
    return codes, heavy


def labeled(tmp_path: Path) -> str:
    """An output of 3 images of one source shard (2 masks each), written without a run."""
    keys = ["000", "001", "002"]
    shard = write_shard(
        tmp_path / "src.tar",
        [(k, {"jpg": image_bytes(24, 16, seed=i)}) for i, k in enumerate(keys)],
    )
    rng = np.random.default_rng(0)
    batch = {
        "shard": column([shard] * 3),
        "key": column(keys),
        "width": np.array([24] * 3),
        "height": np.array([16] * 3),
        "error": column([None] * 3),
        "labels": column([np.array([0, 2], np.int32)] * 3),
        "scores": column([np.array([0.8, 0.4], np.float32)] * 3),
        "logits": column([rng.normal(size=(2, 4, 6)).astype(np.float32) for _ in keys]),
    }
    out = str(tmp_path / "out")
    names = ["cat", "dog", "car"]
    assert list(write_batch(batch, out, names, 0.5, "threshold")["masks"]) == [2, 2, 2]
    output.write_classes(out, names)
    output.write_manifest(
        out, {"inputs": [shard], "config": {"model": "gemlabel-toy"}, "status": "complete"}
    )
    return out


def test_the_read_side_tools_import_no_model_code():
    assert _fresh(list(TOOLS), []) == ([], [])


def test_commands_on_an_output_import_no_model_code(tmp_path):
    out = labeled(tmp_path)
    argvs = [
        ["view", out],
        ["report", out, "--source", str(tmp_path / "src.tar")],
        ["export", "coco", out, str(tmp_path / "coco.json")],
        ["filter", out, "--out", str(tmp_path / "filtered"), "--min-score", "0.5"],
        ["status", out],
    ]
    codes, heavy = _fresh([], argvs)
    assert codes == [0] * len(argvs) and heavy == []
    coco = json.loads((tmp_path / "coco.json").read_text())
    assert len(coco["images"]) == 3 and {a["category_id"] for a in coco["annotations"]} == {1, 3}
    report = (Path(out) / "_gemlabel" / "report.html").read_text()
    assert "weights bundled: gemlabel-toy" in report and "<img" in report
    assert "<img" in (Path(out) / "_gemlabel" / "gallery" / "index.html").read_text()


def test_bundled_models_are_gems():
    """pipeline.weights reads gem's folder; gem.factory lists the same models."""
    assert bundled_models() == sorted(gem.factory.BUNDLED_WEIGHTS) == ["gemlabel-toy"]
