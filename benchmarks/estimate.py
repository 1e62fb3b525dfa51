"""Memory estimator: speed (cold CLI runs vs the meta-device instantiation accelerate's estimate-memory uses) and
accuracy (llama.cpp's own logged buffer sizes; the bytes torch allocates for SmolLM2's parameters).

    python benchmarks/estimate.py            # writes benchmarks/results/estimate.{json,md}
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import machine, run_measured, write_results  # noqa: E402

MiB = 1024**2
REPEATS = 5
LLAMA_8B = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
            "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "vocab_size": 128256, "max_position_embeddings": 131072, "torch_dtype": "bfloat16", "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0, "tie_word_embeddings": False}  # fmt: skip

PEER = """
import sys, json, torch, transformers
cfg = transformers.AutoConfig.from_pretrained(sys.argv[1])
with torch.device("meta"):
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
print(sum(p.numel() * p.element_size() for p in model.parameters()))
"""


def _cpu_s(cmd: list[str]) -> float:
    """user + system CPU seconds of one run: unlike wall time, barely affected by other jobs on the machine."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, check=True, capture_output=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime


def _median_wall(cmd: list[str], repeats: int = REPEATS) -> dict:
    runs = [run_measured(cmd) for _ in range(repeats)]
    cpu = [_cpu_s(cmd) for _ in range(repeats)]
    return {"median_wall_s": statistics.median(r["wall_s"] for r in runs),
            "min_wall_s": min(r["wall_s"] for r in runs), "median_cpu_s": statistics.median(cpu),
            "peak_rss": max(r["peak_rss"] for r in runs)}  # fmt: skip


IN_PROCESS = """
import sys, time
t0 = time.perf_counter()
from llmq.estimate.memory import EstimateConfig, estimate_memory
t1 = time.perf_counter()
estimate_memory(EstimateConfig(sys.argv[1], quants=("bf16", "fp8", "gptq4", "nf4-dq"), gpu="h100", engine="vllm"))
t2 = time.perf_counter()
print(t1 - t0, t2 - t1)
"""


def in_process(cfg: Path) -> dict:
    """The estimator alone (no CLI framework): import time and the estimate itself, median of REPEATS runs."""
    runs = []
    for _ in range(REPEATS):
        out = subprocess.run(
            [sys.executable, "-c", IN_PROCESS, str(cfg)], check=True, capture_output=True, text=True
        )
        runs.append([float(x) for x in out.stdout.split()])
    return {
        "import_s": statistics.median(r[0] for r in runs),
        "estimate_s": statistics.median(r[1] for r in runs),
    }


def speed(tmp: Path, smollm2: Path) -> list[dict]:
    cfg = tmp / "config.json"
    cfg.write_text(json.dumps(LLAMA_8B))
    llmq = [sys.executable, "-m", "llmq", "estimate", "memory"]
    cases = [
        ("llmq: config.json, stored dtype", [*llmq, str(cfg), "--json"]),
        ("llmq: config.json, 4 formats, H100, vLLM, solvers", [*llmq, str(cfg), "-q", "bf16", "-q", "fp8", "-q",
                                                               "gptq4", "-q", "nf4-dq", "--gpu", "h100", "--engine",
                                                               "vllm", "--json"]),  # fmt: skip
        ("llmq: SmolLM2 .gguf (header parse)", [*llmq, str(smollm2), "--context", "8192", "--json"]),
        ("peer: transformers meta-device instantiate (accelerate estimate-memory's method)",
         [sys.executable, "-c", PEER, str(tmp)]),
    ]  # fmt: skip
    rows = [
        {"case": name, **_median_wall(cmd, 3 if name.startswith("peer") else REPEATS)} for name, cmd in cases
    ]
    return rows, in_process(cfg)


def llama_cpp_accuracy(smollm2: Path, tmp: Path) -> list[dict]:
    from llmq.estimate.memory import EstimateConfig, estimate_memory
    from tests.estimate_helpers import llama_log, make_swa_gguf, parse_llama_log

    gen = make_swa_gguf(smollm2, tmp / "gen-gemma2.gguf")
    codes = {"f16": 1, "q8_0": 8, "q4_0": 2}
    cases = [
        (smollm2, n, c, True, True) for n, c in ((512, "f16"), (1000, "q8_0"), (2048, "q4_0"), (8192, "f16"))
    ]
    cases += [
        (gen, 1000, "q8_0", True, False),
        (gen, 3000, "q4_0", True, False),
        (gen, 3000, "f16", True, True),
    ]
    rows = []
    for path, n_ctx, cache, fa, swa_full in cases:
        log = parse_llama_log(llama_log(path, n_ctx=n_ctx, type_k=codes[cache], type_v=codes[cache], flash_attn=fa,
                                        swa_full=swa_full))  # fmt: skip
        est = estimate_memory(EstimateConfig(str(path), engine="llama.cpp", context=n_ctx, kv_cache_dtype=cache,
                                             flash_attn=fa, swa_full=swa_full))  # fmt: skip
        terms = {t.name: t.nbytes for t in est.results[0].terms}
        rows.append({
            "model": path.name, "n_ctx": n_ctx, "cache": cache, "swa_full": swa_full,
            "model_buffer_log_mib": log["model_buffer"][0], "model_buffer_est_mib": round(terms["weights"] / MiB, 2),
            "kv_log_mib": round(sum(k[2] + k[4] for k in log["kv"]), 2),  # K and V as logged (0.01 MiB each)
            "kv_est_mib": round(terms["KV cache K"] / MiB, 2) + round(terms["KV cache V"] / MiB, 2),
            "compute_log_mib": log["compute"], "compute_est_mib": round(terms["compute buffer"] / MiB, 2),
        })  # fmt: skip
    return rows


def torch_accuracy(smollm2: Path, tmp: Path) -> dict:
    import transformers

    from llmq.conversion import convert
    from llmq.estimate.memory import EstimateConfig, estimate_memory

    hf = tmp / "smollm2-hf"
    convert(smollm2, hf)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype="auto")
    real = sum(p.numel() * p.element_size() for p in model.parameters())
    est = estimate_memory(EstimateConfig(str(hf), engine="transformers"))
    return {"model": "SmolLM2-135M (llmq convert)", "torch_param_bytes": real,
            "estimate_bytes": est.results[0].weights_bytes}  # fmt: skip


def main() -> None:
    from llmq.io.hub import packaged_model

    smollm2 = packaged_model()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        sp, inproc = speed(tmp, smollm2)
        acc = llama_cpp_accuracy(smollm2, tmp)
        tor = torch_accuracy(smollm2, tmp)
    lines = ["### Speed (cold process, median of 5 (peer: 3) on a shared 2-core machine; CPU = user + system)", "",
             "| case | median wall s | min wall s | median CPU s | peak RSS MiB |", "|---|---:|---:|---:|---:|"]  # fmt: skip
    for r in sp:
        lines.append(f"| {r['case']} | {r['median_wall_s']:.2f} | {r['min_wall_s']:.2f} | {r['median_cpu_s']:.2f} | "
                     f"{r['peak_rss'] / MiB:.0f} |")  # fmt: skip
    lines += ["", f"Estimator alone (Llama-3-8B config, 4 formats, H100, vLLM, all solvers): import "
              f"{inproc['import_s']:.3f} s + estimate {inproc['estimate_s']:.3f} s (median, in process)."]  # fmt: skip
    lines += ["", "### Accuracy against llama.cpp's verbose log (MiB = 2^20 B, as llama.cpp prints them)", "",
              "KV: the K and V figures of every logged cache (two with SWA), each rounded to 0.01 MiB by llama.cpp; "
              "the tests compare each to the byte-exact estimate within that rounding.", "",
              "| model | n_ctx | cache | swa_full | model buffer log / est | KV log / est | compute log / est (approx.) |",
              "|---|---:|---|---|---:|---:|---:|"]  # fmt: skip
    for r in acc:
        lines.append(f"| {r['model']} | {r['n_ctx']} | {r['cache']} | {r['swa_full']} | {r['model_buffer_log_mib']:.2f}"
                     f" / {r['model_buffer_est_mib']:.2f} | {r['kv_log_mib']:.2f} / {r['kv_est_mib']:.2f} | "
                     f"{r['compute_log_mib']} / {r['compute_est_mib']:.2f} |")  # fmt: skip
    lines += ["", "### Accuracy against torch", "", "| model | torch parameter bytes | estimate | difference |",
              "|---|---:|---:|---:|",
              f"| {tor['model']} | {tor['torch_param_bytes']:,} | {tor['estimate_bytes']:,} | "
              f"{tor['estimate_bytes'] - tor['torch_param_bytes']:,} |"]  # fmt: skip
    write_results(
        "estimate",
        {"machine": machine(), "speed": sp, "in_process": inproc, "llama_cpp": acc, "torch": tor},
        "\n".join(lines),
    )


if __name__ == "__main__":
    main()
