"""The report's words and axes: the weights the run used, round histogram ticks, long class
labels shortened with the full name on hover."""

import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest

import gem
from pipeline.stages.write import write_batch
from pipeline.storage import output
from pipeline.tools.report import nice_ticks, write_report
from tests.test_write import column

LONG = "a remarkably long class name that no chart has room for, really"
NAMES = ["cat", LONG, "car", "tree"]
SVG = "{http://www.w3.org/2000/svg}"


def small_output(path, manifest: dict) -> str:
    """An output of 7 images with scores that give unround equal bins (max 0.61)."""
    rng = np.random.default_rng(0)
    n = 7
    batch = {
        "shard": column(["s.tar"] * n),
        "key": column([f"{i:03d}" for i in range(n)]),
        "width": np.array([20] * n),
        "height": np.array([10] * n),
        "error": column([None] * n),
        "labels": column([np.array([1, 3, 0], np.int32)] * n),
        "scores": column([np.array([0.61, 0.33 - 0.01 * i, 0.07], np.float32) for i in range(n)]),
        "logits": column([rng.normal(size=(3, 4, 4)).astype(np.float32) for _ in range(n)]),
    }
    write_batch(batch, str(path), NAMES, 0.5, "threshold")
    output.write_manifest(str(path), manifest)
    return str(path)


def figures(html: str) -> dict[str, ET.Element]:
    """figure id -> its <svg> element."""
    found = {}
    for piece in html.split('<figure id="')[1:]:
        fid, body = piece.split('"', 1)
        svg = re.search(r"<svg.*?</svg>", body.split("</figure>")[0], re.S)
        if svg:
            found[fid] = ET.fromstring(svg.group())
    return found


def axes(svg: ET.Element) -> dict[str, list[float]]:
    """The numeric tick labels of a vbars chart: "y" (end-anchored, left of the plot) and
    "x" (centred under it)."""
    found = {"x": [], "y": []}
    for text in svg.iter(f"{SVG}text"):
        try:
            value = float("".join(text.itertext()))
        except ValueError:
            continue
        found["y" if text.get("text-anchor") == "end" else "x"].append(value)
    return found


def assert_round(ticks: list[float]) -> None:
    """Ticks are consecutive multiples of one step of the 1-2-5 series."""
    assert len(ticks) >= 2, ticks
    steps = np.diff(ticks)
    step = steps[0]
    assert np.allclose(steps, step), ticks
    mantissa = step / 10 ** np.floor(np.log10(step))
    assert any(np.isclose(mantissa, m) for m in (1, 2, 5)), ticks
    assert all(np.isclose(t / step, round(t / step)) for t in ticks), ticks


def test_nice_ticks_step_in_1_2_5():
    assert nice_ticks(0, 0.61) == pytest.approx([0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    assert nice_ticks(0, 1) == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert nice_ticks(0, 17) == [0, 5, 10, 15]
    assert nice_ticks(1, 230) == [50, 100, 150, 200]
    assert nice_ticks(0, 0) == [0]


def test_report_axes_are_round_and_long_labels_have_their_full_title(tmp_path):
    manifest = {"config": {"model": "gemlabel-tiny", "pretrained": None, "seed": 0}}
    out = small_output(tmp_path / "out", manifest)
    write_report(out, str(tmp_path / "report.html"))
    html = (tmp_path / "report.html").read_text()
    svgs = figures(html)
    for fid in ("scores", "mask-area", "masks-per-image", "long-tail"):
        ticks = axes(svgs[fid])
        assert_round(ticks["x"])
        if fid != "long-tail":  # log scale: 0, 1, 10, ...
            assert_round(ticks["y"])
    assert axes(svgs["scores"])["x"] == pytest.approx([0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    assert axes(svgs["mask-area"])["x"] == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    labels = [
        t for t in svgs["top-classes"].iter(f"{SVG}text") if t.find(f"{SVG}title") is not None
    ]
    long = [t for t in labels if t.find(f"{SVG}title").text == LONG]
    assert len(long) == 1
    shown = "".join(long[0].itertext()).replace(LONG, "", 1)
    assert shown.endswith("…") and LONG.startswith(shown[:-1]) and len(shown) < len(LONG)


@pytest.mark.parametrize(
    ("model", "pretrained", "says"),
    [
        ("gemlabel-toy", None, "bundled: gemlabel-toy"),
        ("gemlabel-tiny", None, "random, seed 3"),
        ("ViT-B-16", "laion2b_s34b_b88k", "open_clip ViT-B-16 laion2b_s34b_b88k"),
    ],
)
def test_report_says_which_weights(tmp_path, model, pretrained, says):
    """From the manifest's `weights`, and for manifests written before it existed, from the
    config: the bundled toy is not "random weights"."""
    config = {"model": model, "pretrained": pretrained, "seed": 3}
    for manifest in ({"config": config}, {"config": config, "weights": {"text": says + " x"}}):
        out = small_output(tmp_path / f"out{len(manifest)}", manifest)
        write_report(out, str(tmp_path / "report.html"))
        html = (tmp_path / "report.html").read_text()
        assert f"weights {says}" in html and "random weights" not in html


def test_describe_weights(tiny_checkpoint):
    import hashlib
    from pathlib import Path

    toy = gem.describe_weights("gemlabel-toy", None, seed=4)
    digest = hashlib.sha256(gem.factory.BUNDLED_WEIGHTS["gemlabel-toy"].read_bytes()).hexdigest()
    assert toy["source"] == "bundled" and toy["sha256"] == digest
    assert toy["text"].startswith("bundled: gemlabel-toy") and digest[:12] in toy["text"]
    assert gem.describe_weights("gemlabel-tiny", None, seed=4) == {
        "source": "random",
        "seed": 4,
        "text": "random, seed 4",
    }
    checkpoint = gem.describe_weights("gemlabel-tiny", tiny_checkpoint)
    want = hashlib.sha256(Path(tiny_checkpoint).read_bytes()).hexdigest()
    assert checkpoint["source"] == "checkpoint" and checkpoint["path"] == tiny_checkpoint
    assert checkpoint["sha256"] == want and tiny_checkpoint in checkpoint["text"]
    tag = gem.describe_weights("ViT-B-16", "openai")
    assert tag == {
        "source": "open_clip",
        "model": "ViT-B-16",
        "tag": "openai",
        "text": "open_clip ViT-B-16 openai",
    }
