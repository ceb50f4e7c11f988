"""`gemlabel` start-up and `gemlabel run`'s errors: commands that neither label nor build
banks import no torch, open_clip or Ray Data; run's errors are reported like every
command's (one line, exit 2 or 1; tracebacks with --debug)."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import pipeline.run
from jobs.choices import METHODS, PRESET_METHODS
from jobs.cli import main

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "open_clip", "ray.data", "gem")

# runs each argv through main in one fresh interpreter; prints the exit codes, then which
# of HEAVY were imported
_PROBE = """
import json, sys
import jobs.cli
codes = []
for argv in json.loads(sys.argv[1]):
    try:
        codes.append(jobs.cli.main(argv))
    except SystemExit as done:
        codes.append(done.code)
print(json.dumps([codes, [m for m in {heavy!r} if m in sys.modules]]))
"""


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _imports(argvs: list[list[str]]) -> tuple[list[int], list[str]]:
    """The exit codes of `argvs` run by main in a fresh process, and the HEAVY modules
    that process imported."""
    done = subprocess.run(
        [sys.executable, "-c", _PROBE.format(heavy=HEAVY), json.dumps(argvs)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    codes, heavy = json.loads(done.stdout.splitlines()[-1])
    return codes, heavy


def test_importing_the_cli_imports_no_model_code():
    assert _imports([]) == ([], [])


def test_commands_that_do_not_label_import_no_model_code(tmp_path):
    address = f"http://127.0.0.1:{_closed_port()}"
    missing = str(tmp_path / "missing")
    argvs = [
        ["--help"],
        ["status", "--help"],
        ["status", "nosuchjob", "--address", address],
        ["logs", "nosuchjob", "--address", address],
        ["stop", "nosuchjob", "--address", address],
        ["submit", "--address", address, "--", "run", "/x.tar", "--vocab", "/v.txt", "--out", "/o"],
        ["view", missing],
        ["report", missing],
        ["export", "coco", missing, str(tmp_path / "coco.json")],
        ["filter", missing, "--out", str(tmp_path / "filtered")],
    ]
    codes, heavy = _imports(argvs)
    assert codes == [0, 0, 2, 2, 2, 2, 2, 2, 2, 2]
    assert heavy == []
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_run_help_and_a_method_read_the_methods_from_gem():
    """The lazy choices are gem's: `run --help` lists them, `--method` checks against them."""
    codes, heavy = _imports([["run", "--help"]])
    assert codes == [0] and "gem" in heavy
    from gem import list_methods
    from gem.eval import PRESETS

    assert list(METHODS) == list_methods() and "naclip" in METHODS and "nope" not in METHODS
    assert PRESET_METHODS == tuple(PRESETS)


@pytest.fixture
def run_args(tmp_path) -> list[str]:
    out = str(tmp_path / "out")
    return ["run", str(tmp_path / "x.tar"), "--vocab", "voc", "--out", out]


def test_run_errors_are_one_line_and_debug_shows_the_traceback(run_args, tmp_path, capsys):
    assert main([*run_args, "--batch-size", "0"]) == 2
    err = capsys.readouterr().err
    assert err == "gemlabel: error: --batch-size must be >= 1\n"
    assert main([*run_args, "--batch-size", "0", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "pipeline/config.py" in err
    assert err.endswith(
        "ValueError: --batch-size must be >= 1\ngemlabel: error: --batch-size must be >= 1\n"
    )
    assert not (tmp_path / "out").exists()


def test_a_bug_in_run_is_one_line_and_exit_1(run_args, capsys, monkeypatch):
    def broken(config):
        raise TypeError("unsupported operand")

    monkeypatch.setattr(pipeline.run, "run", broken)
    monkeypatch.delenv("GEMLABEL_DEBUG", raising=False)
    assert main(run_args) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error: TypeError: unsupported operand" in err
    assert "rerun with --debug" in err
    assert main([*run_args, "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "in broken" in err
