"""What reaches the terminal: control characters escaped everywhere, a full disk named with its path."""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from llmq.cli.app import app, format_error, main
from llmq.cli.options import cell, printable
from llmq.errors import DiskFull

EVIL = "\x1b]0;pwned\x07\x1b[2J\x9b31m\u202egnp.exe\r\n"


def test_printable_escapes_every_control_character():
    out = printable(EVIL)
    assert out == "\\x1b]0;pwned\\x07\\x1b[2J\\x9b31m\\u202egnp.exe\\r\\n"
    assert all(c.isprintable() for c in out)
    assert printable("blk.0.attn_q.weight — ünïcode ✓") == "blk.0.attn_q.weight — ünïcode ✓"
    assert cell("[red]x[/]") == "\\[red]x\\[/]"  # rich markup in a name is shown, not applied


def _evil_gguf(path: Path) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("general.name", EVIL)
    w.add_string("evil.key\x1b[1m", "[bold red]x")
    w.add_tensor("blk.0.\x1b[31mattn_q.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_inspect_escapes_names_and_metadata(tmp_path):
    path = _evil_gguf(tmp_path / "evil.gguf")
    res = CliRunner().invoke(app, ["inspect", str(path)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert not any(c in res.output for c in "\x1b\x07\x9b\u202e\r")
    assert "\\x1b[31mattn_q.weight" in res.output and "\\x1b]0;pwned\\x07" in res.output
    assert "[bold red]x" in res.output  # shown as text


def test_error_line_escapes(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["inspect", str(tmp_path / "no\x1b[2Jsuch.gguf")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "\x1b" not in err and "no\\x1b[2Jsuch.gguf" in err
    assert len(err.strip().splitlines()) == 1
    msg, code = format_error(ValueError("bad\nthing\x1b"))
    assert code == 70 and "\n" not in msg and "\x1b" not in msg


def test_full_disk_names_the_path_and_leaves_nothing(tiny_llama, tmp_path, monkeypatch, capsys):
    import llmq.io.base as base

    def full(fh):
        fh.close()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(base, "fsync_close", full)
    out = tmp_path / "out.gguf"
    with pytest.raises(SystemExit) as e:
        main(["convert", str(tiny_llama), str(out), "--outtype", "f16"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == DiskFull.exit_code == 6
    assert err.startswith("error: no space left on the device of") and str(out) in err, err
    assert "Errno" not in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # nothing partial, no temporary


def test_full_disk_outside_an_atomic_output():
    msg, code = format_error(OSError(errno.ENOSPC, "No space left on device", "/data/x.bin"))
    assert (msg, code) == ("error: no space left on device while writing /data/x.bin", 6)
