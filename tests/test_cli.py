from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llmq.cli.app import format_error
from llmq.errors import BadInput, CorruptFile, MissingDependency

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "llmq", *args], capture_output=True, text=True, cwd=REPO)
    if check and proc.returncode:
        raise AssertionError(proc.stderr)
    return proc


def test_help_imports_no_torch_or_transformers():
    code = (
        "import sys\n"
        "from llmq.cli.app import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'gguf', 'llama_cpp') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO).stdout
    assert "HEAVY []" in out, out


def test_gguf_quantize_imports_no_torch(tmp_path):
    # the registry imports only the gguf method's module: torch's import would cost more than a small model's
    # whole quantization
    from gguf_helpers import tiny_llama_tensors, write_llama_gguf

    t = tiny_llama_tensors(hidden=256, n_layers=1, ff=512, vocab=256, n_head=4, n_kv=1, seed=0)
    src = write_llama_gguf(tmp_path / "f32.gguf", t, n_head=4, n_kv=1)
    code = (
        "import sys\n"
        "from llmq.cli.app import main\n"
        f"try:\n    main(['quantize', {str(src)!r}, '-o', {str(tmp_path / 'q.gguf')!r}, '--method', 'gguf',"
        " '--type', 'Q4_K_M'])\nexcept SystemExit:\n    pass\n"
        "print('HEAVY', [m for m in ('torch', 'transformers') if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert "HEAVY []" in out.stdout, out.stdout + out.stderr
    assert (tmp_path / "q.gguf").exists()


@pytest.mark.parametrize("group", ["convert", "quantize", "inspect", "eval", "estimate"])
def test_every_command_has_help(group):
    proc = run_cli(group, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "Usage" in proc.stdout


def test_version():
    proc = run_cli("--version", check=True)
    from llmq import __version__

    assert proc.stdout.strip() == f"llmq {__version__}"


def test_missing_input_is_one_line_and_nonzero(tmp_path):
    proc = run_cli("convert", str(tmp_path / "nope"), str(tmp_path / "out.gguf"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "nope" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out.gguf").exists()


def test_debug_shows_traceback(tmp_path):
    proc = run_cli("--debug", "convert", str(tmp_path / "nope"), str(tmp_path / "o.gguf"))
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_truncated_gguf_is_one_line(tmp_path, smollm2_gguf_path):
    bad = tmp_path / "trunc.gguf"
    bad.write_bytes(smollm2_gguf_path.read_bytes()[:5000])
    proc = run_cli("inspect", str(bad))
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "truncated" in proc.stderr


def test_pickle_refused(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "pytorch_model.bin").write_bytes(b"\x80\x04")
    (tmp_path / "model" / "config.json").write_text("{}")
    proc = run_cli("inspect", str(tmp_path / "model"))
    assert proc.returncode == 2 and "pickle" in proc.stderr


def test_inspect_json(smollm2_gguf_path):
    proc = run_cli("inspect", "smollm2", "--json", check=True)
    report = json.loads(proc.stdout)
    assert report["kind"] == "gguf"
    assert report["summary"]["n_tensors"] == 272
    assert report["summary"]["types"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    emb = next(t for t in report["tensors"] if t["name"] == "token_embd.weight")
    assert emb["shape"] == [49152, 576] and emb["bpw"] == pytest.approx(8.5)


def test_unknown_method_is_clear(tmp_path, tiny_llama):
    proc = run_cli("quantize", str(tiny_llama), "-o", str(tmp_path / "o"), "--method", "magic")
    assert proc.returncode == 2 and "unknown quantization method 'magic'" in proc.stderr


def test_format_error_table():
    assert format_error(BadInput("bad thing")) == ("error: bad thing", 2)
    assert format_error(CorruptFile("x.gguf: truncated"))[1] == 2
    assert format_error(MissingDependency("pip install x"))[1] == 4
    msg, code = format_error(FileNotFoundError(2, "No such file or directory", "/x"))
    assert code == 1 and "/x" in msg
    msg, code = format_error(ValueError("boom"))
    assert code == 70 and "--debug" in msg
