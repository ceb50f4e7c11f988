"""A real run whose thresholds leave some kept classes without a pixel: those masks are not
written (no row has area 0), the write stage's count of them reaches the manifest, the run's
summary and the report."""

from pathlib import Path

import pyarrow.dataset as pds
import pytest

from jobs.cli import main
from pipeline.storage import output

pytestmark = pytest.mark.slow

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample"


@pytest.mark.parametrize("mask_stage", ["writer", "actor"])
def test_empty_masks_are_dropped_and_counted(ray_local, tmp_path, capsys, mask_stage):
    out = tmp_path / "out"
    args = ["run", str(SAMPLE / "shard-000000.tar"), "--vocab", str(SAMPLE / "vocab.txt")]
    args += ["--out", str(out), "--model", "gemlabel-toy", "--image-size", "64"]
    args += ["--top-k", "4", "--mask-mode", "semantic", "--mask-threshold", "0.9"]
    args += ["--mask-stage", mask_stage]
    assert main(args) == 0
    images = pds.dataset(out / "images").to_table().to_pylist()
    masks = pds.dataset(out / "masks").to_table().to_pylist()
    kept = sum(len(r["labels"]) for r in images)
    assert len(images) == 24 and all(r["status"] == "ok" for r in images)
    assert masks and all(m["area"] > 0 for m in masks)
    manifest = output.read_manifest(str(out))
    run, weights = manifest["run"], manifest["weights"]
    assert weights["source"] == "bundled" and weights["text"].startswith("bundled: gemlabel-toy")
    assert run["dropped_empty"] > 0  # semantic masks at 0.9: most classes get nothing
    assert run["masks"] == len(masks) and run["dropped_empty"] == kept - len(masks)
    assert f"({run['dropped_empty']} empty, not written)" in capsys.readouterr().out

    report = tmp_path / "report.html"
    assert main(["report", str(out), "--html", str(report)]) == 0
    text = report.read_text()
    assert f"{run['dropped_empty']} empty masks not written" in text
    assert f"weights {weights['text']}" in text and "random weights" not in text
