"""llmq convert vs llama.cpp's convert_hf_to_gguf.py, HF → GGUF f16, side by side in one run.

Inputs: SmolLM2-135M-Instruct (converted from the packaged GGUF by llmq) and a generated 1B-class llama (bf16).
Reports wall time, peak RSS, their ratios, and whether every tensor's bytes are identical.
    python benchmarks/convert.py [--skip-1b] [--work DIR]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import REPO, llama_cpp_tree, machine, run_measured, write_results  # noqa: E402
from llmq.io import open_checkpoint  # noqa: E402


def identical(a: Path, b: Path) -> tuple[bool, int, int]:
    ra, rb = open_checkpoint(a), open_checkpoint(b)
    names = set(ra.names())
    if names != set(rb.names()):
        return False, len(names ^ set(rb.names())), len(names)
    diff = 0
    for n in names:
        ia, ib = ra.info(n), rb.info(n)
        if ia.dtype != ib.dtype or ia.shape != ib.shape or not np.array_equal(ra.read_raw(n), rb.read_raw(n)):
            diff += 1
    return diff == 0, diff, len(names)


def bench(label: str, src: Path, work: Path, outtype: str, peer: Path) -> dict:
    ours, theirs = work / f"{label}-llmq.gguf", work / f"{label}-peer.gguf"
    for p in (ours, theirs):
        p.unlink(missing_ok=True)
    # warm the page cache so neither side pays the first read
    for f in src.glob("*.safetensors"):
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass
    peer_run = run_measured(
        [sys.executable, str(peer), str(src), "--outfile", str(theirs), "--outtype", outtype]
    )
    llmq_run = run_measured([sys.executable, "-m", "llmq", "convert", str(src), str(ours), "--outtype", outtype, "-q"],
                            cwd=REPO)  # fmt: skip
    same, ndiff, n = identical(ours, theirs)
    return {
        "model": label, "outtype": outtype, "tensors": n, "identical_tensor_data": same, "differing_tensors": ndiff,
        "llmq_s": round(llmq_run["wall_s"], 2), "peer_s": round(peer_run["wall_s"], 2),
        "time_ratio": round(llmq_run["wall_s"] / peer_run["wall_s"], 3),
        "llmq_peak_rss_mib": round(llmq_run["peak_rss"] / 2**20), "peer_peak_rss_mib": round(peer_run["peak_rss"] / 2**20),
        "rss_ratio": round(llmq_run["peak_rss"] / peer_run["peak_rss"], 3),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-1b", action="store_true")
    ap.add_argument("--work", type=Path, default=None)
    a = ap.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="llmq-bench-convert-"))
    work.mkdir(parents=True, exist_ok=True)
    peer = llama_cpp_tree() / "convert_hf_to_gguf.py"
    smol = work / "smollm2-hf"
    if not smol.exists():
        subprocess.run(
            [sys.executable, "-m", "llmq", "convert", "smollm2", str(smol), "-q"], check=True, cwd=REPO
        )
    rows = [bench("SmolLM2-135M (f32 → f16)", smol, work, "f16", peer)]
    if not a.skip_1b:
        big = work / "llama-1b-bf16"
        if not big.exists():
            subprocess.run(
                [sys.executable, str(REPO / "benchmarks" / "make_synthetic.py"), str(big)], check=True
            )
        rows.append(bench("generated llama 1.1B (bf16 → f16)", big, work, "f16", peer))
    lines = [
        "| model | tensors | llmq s | convert_hf_to_gguf.py s | time ratio | llmq peak RSS MiB | peer peak RSS MiB | RSS ratio | tensor data identical |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['tensors']} | {r['llmq_s']} | {r['peer_s']} | {r['time_ratio']}× | "
                     f"{r['llmq_peak_rss_mib']} | {r['peer_peak_rss_mib']} | {r['rss_ratio']}× | "
                     f"{'yes' if r['identical_tensor_data'] else 'NO (' + str(r['differing_tensors']) + ' differ)'} |")  # fmt: skip
    write_results("convert", {"machine": machine(), "rows": rows}, "\n".join(lines))
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
