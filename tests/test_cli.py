"""The `gemlabel` command line: options -> RunConfig, help, usage errors (exit code 2)."""

import json
import os
import subprocess
import sys

import pytest

from jobs.cli import build_parser, main
from jobs.run import config_from_args
from pipeline.config import RunConfig
from pipeline.storage import output
from tests.shards import write_good_shards
from tests.test_lock import hold_lock


def parse(*args: str):
    return config_from_args(build_parser().parse_args(["run", *args]))


def test_options_map_to_run_config():
    config = parse(
        "a.tar",
        "b/{0..1}.tar",
        "--vocab=v.txt",
        "--out=o",
        "--image-size=448x336",
        "--depth=4",
        "--temperature=0.5",
        "--ensemble=q,v",
        "--no-l2-norm",
        "--top-k=7",
        "--mask-mode=semantic",
        "--actors=2",
        "--gpus-per-actor=0.5",
        "--max-error-rate=0.2",
        "--compile",
        "--resize-stage=actor",
        "--jpeg-stage=actor",
        "--actor-concurrency=3",
    )
    assert (config.resize_stage, config.jpeg_stage, config.actor_concurrency) == ("actor",) * 2 + (
        3,
    )
    defaults = parse("x", "--vocab=v", "--out=o")
    assert (defaults.jpeg_stage, defaults.actor_concurrency) == ("decoder", 2)
    assert config.compile and not parse("x", "--vocab=v", "--out=o").compile
    assert config.inputs == ["a.tar", "b/{0..1}.tar"] and config.vocab == "v.txt"
    assert config.image_size == (448, 336) and config.top_k == 7 and config.actors == 2
    assert config.gem_options == {
        "depth": 4,
        "temperature": 0.5,
        "ensemble": ("q", "v"),
        "l2_norm": False,
    }
    assert config.mask_mode == "semantic" and config.gpus_per_actor == 0.5
    assert parse("x", "--vocab=v", "--out=o").gem_options == {}  # the method's defaults
    assert parse("x", "--vocab=v", "--out=o").image_size == (448, 448)


def test_help_explains_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in (
        "--model",
        "--pretrained",
        "--method",
        "--top-k",
        "--score-threshold",
        "--mask-threshold",
        "--mask-mode",
        "--image-size",
        "--batch-size",
        "--actors",
        "--gpus-per-actor",
        "--address",
        "--max-error-rate",
        "--templates",
        "--precision",
        "--depth",
        "--iterations",
        "--temperature",
        "--ensemble",
        "--no-l2-norm",
        "--jpeg-stage",
        "--actor-concurrency",
    ):
        assert option in text


@pytest.mark.parametrize(
    "args",
    [
        ["--mask-mode=blob"],
        ["--image-size=big"],
        ["--ensemble=qx"],
        ["--method=nope"],
        ["--background=,"],
        ["--refine=crf"],
    ],
)
def test_bad_options_exit_2(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "x.tar", "--vocab=v", "--out=o", *args])
    assert exit_info.value.code == 2


def test_method_and_refine_options():
    config = parse("x", "--vocab=v", "--out=o", "--method=naclip", "--refine=pamr")
    assert (config.method, config.refine) == ("naclip", "pamr")
    settings = config.output_settings()
    assert (settings["method"], settings["refine"]) == ("naclip", "pamr")
    assert parse("x", "--vocab=v", "--out=o", "--refine=none").refine is None
    assert parse("x", "--vocab=v", "--out=o").output_settings()["refine"] is None
    with pytest.raises(ValueError, match="--refine must be one of"):
        RunConfig(inputs=["a.tar"], vocab="v", out="o", refine="crf")


def test_bad_refine_is_a_clear_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "x.tar", "--vocab=v", "--out=o", "--refine=crf"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--refine" in err and "invalid choice: 'crf'" in err and "'pamr'" in err


def test_usage_errors_exit_2_before_any_work(tmp_path, vocab_file, capsys):
    shards = write_good_shards(tmp_path / "shards", n_shards=1, per_shard=1)
    out = str(tmp_path / "out")
    base = ["run", *shards, "--out", out, "--model", "gemlabel-tiny", "--pretrained", "random"]
    assert main([*base, "--vocab", str(tmp_path / "missing.txt")]) == 2
    assert main(["run", str(tmp_path / "*.tgz"), "--vocab", vocab_file, "--out", out]) == 2
    assert main([*base, "--vocab", vocab_file, "--mask-threshold", "0"]) == 2
    assert main([*base, "--vocab", vocab_file, "--model", "no-such-model"]) == 2
    assert main([*base, "--vocab", vocab_file, "--jpeg-stage", "actor"]) == 2
    assert main([*base, "--vocab", vocab_file, "--actor-concurrency", "0"]) == 2
    assert output.read_manifest(out) is None  # nothing written: a corrected rerun just works
    output.write_manifest(out, {"config": {"model": "something-else"}, "status": "complete"})
    assert main([*base, "--vocab", vocab_file]) == 2
    holder = hold_lock(out)  # another run writing there: refused, even with --overwrite
    try:
        assert main([*base, "--vocab", vocab_file, "--overwrite"]) == 2
    finally:
        holder.communicate("")
    assert output.read_manifest(out)["config"] == {"model": "something-else"}  # untouched
    errors = capsys.readouterr().err
    assert "missing.txt" in errors and "no shards" in errors and "--mask-threshold" in errors
    assert "unknown model 'no-such-model'" in errors
    assert "--jpeg-stage actor needs --resize-stage actor" in errors
    assert "--actor-concurrency must be >= 1" in errors
    assert "different configuration" in errors and "--overwrite" in errors
    assert "is being written by another gemlabel run" in errors


def test_output_settings_survive_the_manifest_json():
    """Resume compares these with the manifest's JSON: tuples must not sneak in."""
    config = parse("a.tar", "--vocab=v", "--out=o", "--mask-mode=background", "--background=a,b")
    settings = config.output_settings()
    assert json.loads(json.dumps(settings)) == settings
    assert settings["background"] == ["a", "b"]


def test_background_mode_needs_a_prompt():
    with pytest.raises(ValueError, match="at least one background prompt"):
        RunConfig(inputs=["a.tar"], vocab="v", out="o", mask_mode="background", background=())
    RunConfig(inputs=["a.tar"], vocab="v", out="o", background=())  # unused by other modes


def test_closed_stdout_stops_quietly():
    """`gemlabel prompts list | head -c 1`: the command stops without a traceback (unbuffered,
    so that its next line is written after the reader has gone)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", "prompts", "list"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    proc.stdout.read(1)
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 1
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
