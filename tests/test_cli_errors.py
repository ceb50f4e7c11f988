"""What a user's mistakes get from the `gemlabel` command: one line naming what was typed,
exit code 2, nothing created; tracebacks only with --debug and for bugs."""

import socket
import time

import pytest

import jobs.cli
from jobs.cli import main
from pipeline.storage import output

READERS = [
    ["view", "{out}"],
    ["view", "{out}", "--dest", "{dest}"],
    ["report", "{out}"],
    ["report", "{out}", "--html", "{dest}/report.html"],
    ["export", "coco", "{out}", "{dest}/labels.json"],
    ["export", "coco", "{out}", "{dest}/labels.json", "--write-images", "{dest}/images"],
    ["filter", "{out}", "--out", "{dest}", "--min-score", "0.5"],
    ["shards", "{out}", "--out", "{dest}"],
]


@pytest.mark.parametrize("args", READERS, ids=lambda a: " ".join(a[:2]))
@pytest.mark.parametrize("kind", ["missing", "empty", "other files"])
def test_readers_refuse_what_is_not_an_output(tmp_path, capsys, args, kind):
    """No manifest and no tables: exit 2 naming the path, and nothing created."""
    out = tmp_path / "out"
    if kind != "missing":
        out.mkdir()
    if kind == "other files":
        (out / "notes.txt").write_text("not an output\n")
        (out / "images").mkdir()
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    dest = tmp_path / "dest"
    code = main([a.format(out=out, dest=dest) for a in args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("gemlabel: error: ")
    assert str(out) in err and "expected the --out of a gemlabel run" in err
    assert ("does not exist" in err) == (kind == "missing")
    assert "Traceback" not in err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_require_output_accepts_a_manifest_or_tables(tmp_path):
    out = tmp_path / "out"
    output.write_manifest(str(out), {"status": "incomplete"})
    assert output.require_output(str(out)) == {"status": "incomplete"}
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(output.NotAnOutputError, match="not a gemlabel manifest"):
        output.require_output(str(out))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "command, form",
    [(c, "http") for c in ("status", "logs", "stop", "submit")]
    + [("status", f) for f in ("cluster", "env", "none")],
)
def test_job_commands_without_a_dashboard_answer_fast(tmp_path, capsys, monkeypatch, command, form):
    """No dashboard at the address (a closed port): one line within 10 s naming the address
    tried and how to set it. Forms: an http URL, a cluster (GCS) address that Ray resolves,
    RAY_API_SERVER_ADDRESS, and nothing at all (a local cluster, else 127.0.0.1:8265)."""
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    port = _closed_port()
    address = {"http": f"http://127.0.0.1:{port}", "cluster": f"127.0.0.1:{port}"}.get(form)
    if form == "env":
        address = f"http://127.0.0.1:{port}"
        monkeypatch.setenv("RAY_API_SERVER_ADDRESS", address)
    flags = ["--address", address] if form in ("http", "cluster") else []
    if command == "submit":
        (tmp_path / "v.txt").write_text("cat\n")
        args = [
            "submit",
            *flags,
            "--",
            "run",
            f"{tmp_path}/a.tar",
            "--vocab",
            f"{tmp_path}/v.txt",
            "--out",
            f"{tmp_path}/out",
        ]
    else:
        args = [command, *flags, "raysubmit_x"]
    started = time.monotonic()
    code = main(args)
    seconds = time.monotonic() - started
    err = capsys.readouterr().err
    assert code == 2 and seconds < 10, (seconds, err)
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "--address http://HEAD:8265" in err and "RAY_API_SERVER_ADDRESS" in err
    if address:
        assert address in err
    assert not (tmp_path / "out").exists()


def test_bugs_are_one_line_unless_debug(tmp_path, capsys, monkeypatch):
    """An unexpected exception: one line and exit 1; --debug or GEMLABEL_DEBUG=1 adds the
    traceback; a user error gets its traceback only with --debug."""

    def broken(args):
        raise TypeError("unsupported operand")

    monkeypatch.setattr(jobs.cli, "cmd_view", broken)
    monkeypatch.delenv("GEMLABEL_DEBUG", raising=False)
    assert main(["view", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "TypeError: unsupported operand" in err
    assert "--debug" in err and "GEMLABEL_DEBUG=1" in err
    assert main(["view", str(tmp_path), "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("GEMLABEL_DEBUG", "1")
    assert main(["view", str(tmp_path)]) == 1
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.undo()
    monkeypatch.delenv("GEMLABEL_DEBUG", raising=False)
    assert main(["report", str(tmp_path / "nothing"), "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "NotAnOutputError" in err


def test_debug_is_accepted_by_nested_commands(capsys):
    assert main(["prompts", "list", "--debug"]) == 0
    assert "voc" in capsys.readouterr().out
