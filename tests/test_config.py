"""RunConfig: checked once, with messages that name the flag; the CLI's defaults are its
own; the stage options built from it; and loading it loads no torch."""

import dataclasses
import inspect
import subprocess
import sys

import pytest

from jobs.run import parse_run_args, run_defaults
from pipeline.config import RunConfig
from pipeline.stages.options import Batching, DecodeOptions, WriteOptions

BASE = {"inputs": ["a.tar"], "vocab": "v.txt", "out": "o"}


def config(**kwargs) -> RunConfig:
    return RunConfig(**{**BASE, **kwargs})


def test_cli_defaults_are_run_config_defaults():
    parsed = parse_run_args(["run", "a.tar", "--vocab", "v.txt", "--out", "o"])
    assert parsed == config()
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    assert set(run_defaults()) == fields - {"inputs", "vocab", "out", "gem_options"}


def test_loading_the_config_loads_no_torch():
    code = (
        "import sys, pipeline.config, pipeline.summary, pipeline.exit_codes\n"
        "print(sorted(m for m in ('torch', 'PIL', 'pycocotools', 'ray', 'open_clip')"
        " if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "--batch-size must be >= 1"),
        ({"rows_per_file": 0}, "--rows-per-file must be >= 1"),
        ({"decode_batch_size": 0}, "--decode-batch-size must be >= 1"),
        ({"top_k": 0}, "--top-k must be >= 1"),
        ({"mask_threshold": 2.0}, "--mask-threshold must lie in (0, 1]"),
        ({"mask_threshold": 0.0}, "--mask-threshold must lie in (0, 1]"),
        ({"max_error_rate": -0.1}, "--max-error-rate must lie in [0, 1]"),
        ({"actors": 0}, "--actors must be >= 1"),
        ({"actor_concurrency": 0}, "--actor-concurrency must be >= 1"),
        ({"stall_timeout": 0}, "--stall-timeout must be > 0"),
        ({"image_size": (0, 8)}, "--image-size must be positive"),
        ({"precision": "fp8"}, "--precision must be one of"),
        ({"mask_mode": "x"}, "--mask-mode must be one of"),
        ({"refine": "crf"}, "--refine must be one of"),
        ({"jpeg_stage": "actor"}, "--jpeg-stage actor needs --resize-stage actor"),
        ({"mask_mode": "background", "background": ()}, "needs at least one background prompt"),
        ({"inputs": []}, "at least one INPUT is required"),
        ({"vocab": None}, "a vocabulary (--vocab) or a bank (--bank) is required"),
    ],
)
def test_bad_settings_name_the_flag(kwargs, message):
    with pytest.raises(ValueError) as error:
        config(**kwargs)
    assert message in str(error.value)


def test_stage_options_say_where_work_happens():
    plain = config()
    assert plain.decode_options() == DecodeOptions((448, 448), resize_to_model_input=True)
    label = plain.label_options()
    assert not (label.resize_on_device or label.decode_jpegs_on_device or label.make_masks)
    assert label.background == ()  # background prompts only compete in mask mode background
    on_actor = config(resize_stage="actor", jpeg_stage="actor", mask_stage="actor")
    decode, label = on_actor.decode_options(), on_actor.label_options()
    assert not decode.resize_to_model_input and decode.leave_jpegs_to_actor
    assert label.resize_on_device and label.decode_jpegs_on_device and label.make_masks
    background = config(mask_mode="background", background=("sky", "wall"), refine="pamr")
    label = background.label_options()
    assert (label.background, label.mask_mode, label.refine) == (
        ("sky", "wall"),
        "background",
        "pamr",
    )
    assert background.write_options(["a"]) == WriteOptions(["a"], 0.5, "background")
    assert config(decode_batch_size=8, batch_size=4, rows_per_file=16).batching() == Batching(
        8, 4, 16, 2
    )


def test_stage_options_are_the_stages_parameters():
    """The options' fields are the keyword arguments the dataset hands the stages."""
    from pipeline.stages.decode import decode_batch
    from pipeline.stages.write import write_batch

    def names(options) -> set[str]:
        return {f.name for f in dataclasses.fields(options)}

    assert names(DecodeOptions) <= set(inspect.signature(decode_batch).parameters)
    assert names(WriteOptions) <= set(inspect.signature(write_batch).parameters)


def test_default_weights_are_the_papers_and_random_is_asked_for():
    plain = config()
    assert (plain.model, plain.pretrained) == ("ViT-B-16", "laion2b_s34b_b88k")
    assert plain.weights == "laion2b_s34b_b88k" and not plain.random_weights
    tiny = config(model="gemlabel-tiny", pretrained="random")
    assert tiny.weights is None and tiny.random_weights
    assert tiny.output_settings()["pretrained"] == "random"
    assert tiny.label_options().pretrained is None  # what gem takes for seeded random weights
    assert config(model="gemlabel-toy").pretrained is None  # its bundled weights


def test_a_run_without_weights_is_refused_before_anything(tmp_path, capsys, monkeypatch):
    """`gemlabel run` with a model that has no default weights and no --pretrained, or with
    a --vocab file that does not exist: exit 2, one line naming the flag, nothing written."""
    from jobs.cli import main

    monkeypatch.setenv("GEMLABEL_BANK_CACHE", str(tmp_path / "banks"))
    (tmp_path / "v.txt").write_text("cat\n")
    out = tmp_path / "out"
    base = ["run", str(tmp_path / "a.tar"), "--out", str(out)]
    assert main([*base, "--vocab", str(tmp_path / "v.txt"), "--model", "gemlabel-tiny"]) == 2
    err = capsys.readouterr().err
    assert "--model gemlabel-tiny has no default weights" in err and "--pretrained random" in err
    missing = str(tmp_path / "classes.txt")
    assert main([*base, "--vocab", missing, "--model", "gemlabel-toy"]) == 2
    assert f"--vocab {missing}: no such file" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "banks").exists()
