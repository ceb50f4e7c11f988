"""Every shell command in README.md and docs/*.md runs as written after `make demo`.

The ```bash and ```sh blocks are split into commands (lines joined at a trailing `\\`,
comments and blank lines dropped). A command is skipped when it needs what a test
machine lacks, by one rule (`SKIP`): a cluster or a Ray dashboard, an object store, real
CLIP weights, containers or Kubernetes, the network (pip, a second virtualenv), a dataset
or corpus that is not in the repository (`data/shards/`, `classes.txt`, `VOCdevkit`), or
a long job (training the toy, benchmarks, `make`). Every other command runs, in the order
the page gives, with `bash` in a directory laid out as the repository after `make demo`
(`data/`, `docs/`, `.venv/` linked; `out/demo` made by the Makefile's own demo recipe with
the bundled toy model), and must exit 0; a command that an earlier page ran as written
is not run again.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP = re.compile(
    r"--address|RAY_API_SERVER_ADDRESS|RAY_ADDRESS|\$JOB|gemlabel (submit|logs|stop)\b"
    r"|s3://|gs://|ViT-|--pretrained|AWS_|GOOGLE_"
    r"|\bdocker\b|\bkubectl\b|\bray (up|down|dashboard)\b"
    r"|pip install|-m venv|refvenv|release_parity"
    r"|data/shards/|classes\.txt|VOCdevkit|gemlabel eval"
    r"|\bmake\b|gem\.toy\.train|benchmarks"
)
COMMAND_TIMEOUT_S = 600


def commands(page: Path) -> list[str]:
    """The shell commands of a page's ```bash / ```sh blocks, in order."""
    found = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", page.read_text(), re.S):
        for command in re.sub(r"\\\n\s*", " ", block).splitlines():
            if command.strip() and not command.lstrip().startswith("#"):
                found.append(command.strip())
    return found


def skipped(command: str) -> bool:
    """Whether the rule skips `command` (its trailing `# comment` left out)."""
    return SKIP.search(re.split(r"\s#\s", command)[0]) is not None


def runnable(page: Path) -> list[str]:
    return [c for c in commands(page) if not skipped(c)]


def demo_recipe() -> list[str]:
    """The shell lines of the Makefile's `demo` target, with `$(VENV)/bin/` and make's `@`
    dropped."""
    text = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^demo:.*\n((?:\t.*\n)+)", text, re.M).group(1)
    joined = re.sub(r"\\\n\t\s*", " ", recipe)
    return [line.strip().lstrip("@").replace("$(VENV)/bin/", "") for line in joined.splitlines()]


def test_pages_have_commands_and_the_rule_skips_only_what_it_says():
    readme = runnable(ROOT / "README.md")
    assert any(c.startswith("gemlabel run ") for c in readme)
    assert any(c.startswith("gemlabel status ") for c in readme)
    assert any(c.startswith("python docs/train_example.py") for c in readme)
    assert "source .venv/bin/activate" in " ".join(readme)
    left_out = [c for page in PAGES for c in commands(page) if skipped(c)]
    assert any("ViT-B-16" in c for c in left_out) and any("kubectl" in c for c in left_out)
    assert not skipped("gemlabel status out/demo   # or an s3:// URL")
    runs = [line for line in demo_recipe() if line.startswith("gemlabel run ")]
    assert len(runs) == 1 and "gemlabel-toy" in runs[0]


def test_readme_says_how_to_call_what_was_installed():
    """Right after the two set-up commands: how `gemlabel` and `python` are reached."""
    text = (ROOT / "README.md").read_text()
    setup = text.index("make test")
    commands_table = text.index("## Commands")
    between = text[setup:commands_table]
    assert "source .venv/bin/activate" in between and ".venv/bin/gemlabel" in between
    assert ".venv/bin/python" in between


@pytest.fixture(scope="module")
def after_demo(tmp_path_factory) -> tuple[Path, dict, set, str]:
    """A directory laid out as the repository after `make demo`, the environment, the
    commands run there so far (a command a page repeats is not run twice), and what the
    demo printed (stdout and stderr, not a terminal: as in a log)."""
    work = tmp_path_factory.mktemp("after-demo")
    for name in ("data", "docs", ".venv"):
        if (ROOT / name).exists():
            (work / name).symlink_to(ROOT / name)
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    printed = ""
    for line in demo_recipe():
        done = subprocess.run(
            ["bash", "-c", line],
            cwd=work,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=900,
        )
        printed += done.stdout
        assert done.returncode == 0, f"make demo: {line}\n{done.stdout[-5000:]}"
    return work, env, set(), printed


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_commands_run_as_written(page, after_demo):
    work, env, ran, _ = after_demo
    for command in runnable(page):
        if command in ran:
            continue
        ran.add(command)
        done = subprocess.run(
            ["bash", "-c", command],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
        )
        assert done.returncode == 0, (
            f"{page.name}: {command}\nexit {done.returncode}\n"
            f"{done.stdout[-2000:]}{done.stderr[-3000:]}"
        )


# what the demo must not print: pip and setuptools, Python warnings, Ray Data's notes on
# starting a dataset, its plan and its progress display, progress per operator (Ray's
# core_worker line about actor constructor arguments is explained in the README)
NOISE = re.compile(
    r"editable|setuptools|Warning|warnings\.warn|Execution plan|Starting execution"
    r"|Progress will be logged|progress UI|-- (MapBatches|ReadShard)"
)


@pytest.mark.slow
def test_demo_output_fits_one_screen(after_demo):
    """What the demo prints in a log: its heading, a few lines of Ray Data's progress, the
    summary and where to look; no noise."""
    printed = after_demo[3]
    print(printed)
    lines = printed.splitlines()
    assert len(lines) <= 15, printed
    assert not [line for line in lines if NOISE.search(line)], printed
    assert any(line.startswith("gemlabel run complete: 48 images") for line in lines)
    assert any(line.startswith("gallery: ") for line in lines)
