"""Shared helpers of the benchmark scripts: measured subprocess runs, the llama.cpp source tree, result files."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
CACHE = Path(os.environ.get("LLMQ_CACHE", Path.home() / ".cache" / "llmq"))


def peak_rss_bytes() -> int:
    """This process's peak RSS (VmHWM): unlike ru_maxrss it is not inherited from the parent across fork+exec."""
    import resource

    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_measured(cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> dict:
    """Run ``cmd`` in a fresh wrapper process; return wall seconds and the peak RSS of the command (bytes)."""
    wrapper = (
        "import resource, subprocess, sys, time, json\n"
        "t = time.perf_counter()\n"
        "rc = subprocess.run(sys.argv[1:]).returncode\n"
        "wall = time.perf_counter() - t\n"
        "rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024\n"
        "print(json.dumps({'rc': rc, 'wall_s': wall, 'peak_rss': rss}), file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd)  # fmt: skip
    last = proc.stderr.strip().splitlines()[-1]
    out = json.loads(last)
    if out["rc"]:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return out


def llama_cpp_tree() -> Path:
    """vendor/llama.cpp of the llama-cpp-python source distribution (downloaded once from PyPI, cached)."""
    root = CACHE / f"llama-cpp-python-{LLAMA_CPP_PYTHON_VERSION}"
    tree = root / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}" / "vendor" / "llama.cpp"
    if tree.exists():
        return tree
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d",
                    str(root), f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"], check=True)  # fmt: skip
    sdist = next(root.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(sdist) as tf:
        tf.extractall(root, filter="data")
    return tree


def machine() -> dict:
    return {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}  # fmt: skip


def write_results(name: str, data: dict, table: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(table + "\n")
    print(table)
