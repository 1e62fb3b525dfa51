"""Killed and interrupted runs leave nothing behind (issue 15, "Debris and signals").

Every writing command runs in a subprocess on a tiny model, paused at a chosen point (tests/signal_wrapper.py:
right after a temporary is created, or at the fsync of a complete but not yet renamed output), gets SIGTERM or
SIGINT, and must exit 128 + signum leaving nothing in its output directory but what was there before (and, for
GPTQ/AWQ, the resume directory, which is kept on purpose and named as such).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmq.io import temporaries

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX signals and /proc")

REPO = Path(__file__).resolve().parents[1]
WRAPPER = Path(__file__).with_name("signal_wrapper.py")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def run_and_signal(args: list[str], pause: str, sig: int, timeout: float = 300) -> tuple[int, str, int]:
    """Start the CLI paused at ``pause``; send ``sig`` once it is there. Returns (exit code, stderr, pid)."""
    proc = subprocess.Popen([sys.executable, str(WRAPPER), pause, "--", *args], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, cwd=REPO, env=_env())  # fmt: skip
    lines = []
    deadline = time.monotonic() + timeout
    assert proc.stderr is not None
    try:
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("PAUSED"):
                proc.send_signal(sig)
                break
            if time.monotonic() > deadline:
                break
        rest = proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, "".join(lines) + rest, proc.pid


def _leftovers(d: Path, before: set[str]) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name not in before)


def _alive_copies(marker: str) -> list[int]:
    """Processes whose command line holds ``marker``: forked encoder workers share their parent's."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes()
                state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if marker.encode() in cmd and state != "Z":
                found.append(int(proc.name))
    return found


@pytest.fixture(scope="module")
def tiny_gguf(tiny_llama, tmp_path_factory) -> Path:
    from llmq.api import convert

    out = tmp_path_factory.mktemp("sig") / "tiny-f32.gguf"
    convert(tiny_llama, out, outtype="f32")
    return out


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    from pydoc_data.topics import topics

    p = tmp_path_factory.mktemp("sigtext") / "text.txt"
    p.write_text("\n\n".join(topics[k] for k in sorted(topics))[:40000])
    return p


CALIB = ["--calibration", "pydocs", "--nsamples", "2", "--seqlen", "32"]

# (id, argv builder (src model dir, src gguf, text file, out dir), pause, signal, kept on purpose)
CASES = [
    ("convert-hf-gguf", lambda m, g, t, o: ["convert", str(m), str(o / "out.gguf"), "--outtype", "f16"],
     "fsync:1", signal.SIGTERM, None),
    ("convert-gguf-hf", lambda m, g, t, o: ["convert", str(g), str(o / "out")], "create:.out.llmq-tmp-:1",
     signal.SIGINT, None),
    ("quantize-rtn", lambda m, g, t, o: ["quantize", str(m), "-o", str(o / "out"), "-m", "rtn", "--group-size",
                                         "64"], "fsync:1", signal.SIGINT, None),
    ("quantize-nf4", lambda m, g, t, o: ["quantize", str(m), "-o", str(o / "out"), "-m", "nf4"],
     "create:.out.llmq-tmp-:1", signal.SIGTERM, None),
    # from an HF directory (streamed, no intermediate file): at the output's first fsync, and with encoder
    # worker processes running at the output's temporary
    ("quantize-gguf-hf", lambda m, g, t, o: ["quantize", str(m), "-o", str(o / "out.gguf"), "-m", "gguf",
                                             "--type", "Q4_K_M"], "fsync:1", signal.SIGINT, None),
    ("quantize-gguf-workers", lambda m, g, t, o: ["quantize", str(m), "-o", str(o / "out.gguf"), "-m", "gguf",
                                                  "--type", "Q4_K_M", "--threads", "2"],
     "create:.out.gguf.llmq-tmp-:1", signal.SIGTERM, None),
    ("quantize-gptq", lambda m, g, t, o: ["quantize", str(m), "-o", str(o / "out"), "-m", "gptq", "--group-size",
                                          "64", *CALIB], "create:.out.llmq-tmp-:1", signal.SIGTERM,
     ".out.llmq-resume"),
    # mid-calibration: block 0 handed to the resume writer's thread, block 1 about to run
    ("quantize-gptq-mid-blocks", lambda m, g, t, o: ["quantize", str(m), "-o", str(o / "out"), "-m", "gptq",
                                                     "--group-size", "64", *CALIB],
     "after:llmq.quant.blockwise.resume:ResumeDir.save_block:1", signal.SIGINT, ".out.llmq-resume"),
    ("quantize-awq", lambda m, g, t, o: ["quantize", str(m), "-o", str(o / "out"), "-m", "awq", "--group-size",
                                         "64", *CALIB], "fsync:1", signal.SIGINT, ".out.llmq-resume"),
    ("eval-output", lambda m, g, t, o: ["eval", "perplexity", str(m), "--dataset", str(t), "--ctx", "64",
                                        "--chunks", "2", "--output", str(o / "res.json")],
     "create:.res.json.llmq-tmp-:1", signal.SIGTERM, None),
    # the imatrix is saved after the output is complete
    ("save-imatrix", lambda m, g, t, o: ["quantize", str(m), "-o", str(o / "out.gguf"), "-m", "gguf", "--type",
                                         "Q4_K_M", "--calibration", str(t), "--nsamples", "2", "--seqlen", "32",
                                         "--save-imatrix", str(o / "im.gguf")], "create:.im.gguf.llmq-tmp-:1",
     signal.SIGINT, "out.gguf"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "argv", "pause", "sig", "kept"), CASES, ids=[c[0] for c in CASES])
def test_signal_leaves_nothing(name, argv, pause, sig, kept, tiny_llama, tiny_gguf, text_file, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "unrelated.txt").write_text("mine")  # a user's file beside the output stays
    before = {p.name for p in out_dir.iterdir()}
    inputs = {p: p.stat().st_mtime_ns for p in [*tiny_llama.iterdir(), tiny_gguf, text_file]}
    code, err, pid = run_and_signal(argv(tiny_llama, tiny_gguf, text_file, out_dir), pause, sig)
    assert "PAUSED" in err, err[-3000:]
    assert code == 128 + sig, err[-3000:]
    assert f"interrupted by {signal.Signals(sig).name}" in err
    assert "Traceback" not in err, err[-3000:]
    left = _leftovers(out_dir, before)
    assert left == ([kept] if kept else []), left
    if kept and kept.endswith("llmq-resume"):
        assert "--resume" in err  # the kept directory is named on the way out
    assert (out_dir / "unrelated.txt").read_text() == "mine"
    assert {p: p.stat().st_mtime_ns for p in inputs} == inputs  # inputs untouched
    time.sleep(0.2)
    assert not _alive_copies(str(out_dir)), "a worker process outlived the interrupted run"


def test_stale_temporaries_of_a_killed_run_are_swept(tiny_llama, tmp_path):
    """kill -9 cannot be caught: the next run into that directory removes what the dead process left, says so,
    and leaves a live process's temporaries, the resume directory and foreign files alone."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args = ["quantize", str(tiny_llama), "-o", str(out_dir / "q"), "-m", "rtn", "--group-size", "64"]
    code, err, dead = run_and_signal(args, "create:1", signal.SIGKILL)
    assert code == -signal.SIGKILL
    stale = [p for p in out_dir.iterdir() if temporaries.TMP_TAG in p.name]
    assert len(stale) == 1 and f"-{dead}-" in stale[0].name
    # a live process's temporary (this one's parent: alive) and the intended exception stay
    live = out_dir / f".x.llmq-tmp-{temporaries._host_tag()}-{os.getppid()}-abc"
    live.mkdir()
    (out_dir / ".q.llmq-resume").mkdir()
    proc = subprocess.run([sys.executable, "-m", "llmq", "quantize", str(tiny_llama), "-o", str(out_dir / "q2"),
                           "-m", "rtn", "--group-size", "64"], capture_output=True, text=True, cwd=REPO,
                          env=_env())  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"note: removed {stale[0]}" in proc.stderr and f"process {dead}" in proc.stderr
    assert sorted(p.name for p in out_dir.iterdir()) == sorted([".q.llmq-resume", live.name, "q2"])


def test_second_signal_exits_at_once_and_still_cleans(tiny_llama, tmp_path):
    """A second signal while the first unwinds: no waiting, and the registered temporaries still go."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code = (
        "import os, signal, sys, time\n"
        "from llmq.io import temporaries\n"
        "from llmq.io.base import AtomicOutput\n"
        "with temporaries.interrupts_unwind():\n"
        f"    with AtomicOutput({str(out_dir / 'o')!r}, is_dir=True) as tmp:\n"
        "        (tmp / 'part').write_bytes(b'x' * 1000)\n"
        "        try:\n"
        "            os.kill(os.getpid(), signal.SIGTERM)\n"
        "            time.sleep(5)\n"
        "        finally:\n"  # an unwinding step that hangs: the second signal must not wait for it
        "            print('UNWINDING', file=sys.stderr, flush=True)\n"
        "            time.sleep(120)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stderr=subprocess.PIPE, text=True, cwd=REPO, env=_env()
    )
    assert proc.stderr is not None
    assert proc.stderr.readline().startswith("UNWINDING")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 128 + signal.SIGINT
    assert list(out_dir.iterdir()) == []


def test_atomic_output_registry_and_force_replace(tmp_path):
    from llmq.io.base import AtomicOutput

    dst = tmp_path / "d"
    dst.mkdir()
    (dst / "old").write_text("old")
    with AtomicOutput(dst, is_dir=True, force=True) as tmp:
        assert tmp in temporaries.live() and f"-{os.getpid()}-" in tmp.name
        (tmp / "new").write_text("new")
    assert [p.name for p in dst.iterdir()] == ["new"]
    assert temporaries.live() == [] and sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    with pytest.raises(RuntimeError), AtomicOutput(tmp_path / "f", is_dir=False) as tmp:
        tmp.write_text("partial")
        raise RuntimeError("boom")
    assert temporaries.live() == [] and sorted(p.name for p in tmp_path.iterdir()) == ["d"]
