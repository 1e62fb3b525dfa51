"""Perplexity benchmark: llmq side by side with its peers, in one run.

1. GGUF path: `llmq` (llama.cpp through llama-cpp-python) against `llama-perplexity` built from the same
   vendored llama.cpp, same file, text and ctx: PPL agreement and end-to-end tokens/s (target >= 0.95x).
2. HF path: llmq's torch backend against a plain transformers loop over the same chunks (one chunk per
   forward, full logits, torch.no_grad): identical PPL, tokens/s of the evaluation loop (target >= 1.5x).
3. Optionally (--table), PPL and KL divergence of GGUF variants against an f32 base.

Writes JSON and a markdown table under benchmarks/results/.

    python benchmarks/perplexity.py --hf /tmp/smol_hf --table /tmp/smol-f32.gguf /tmp/smol-q8_0.gguf ...
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from llmq.eval.perplexity import PerplexityConfig, compare, evaluate, load_eval_text, prepare_text

ROOT = Path(__file__).resolve().parent


def gguf_vs_llama_perplexity(
    gguf: str, text_file: Path, ctx: int, chunks: int, threads: int, repeat: int = 2
) -> dict:
    from llmq.eval.backends import resolve_model
    from llmq.eval.llamacpp_tools import llama_perplexity

    binary = llama_perplexity(build=True)
    model = str(resolve_model(gguf))
    cfg = PerplexityConfig(dataset=str(text_file), ctx=ctx, chunks=chunks, threads=threads)
    runs: dict[str, list] = {"llmq": [], "llama-perplexity": []}
    for _ in range(repeat):  # alternate the two, keep the best of each (a shared machine is noisy)
        t0 = time.perf_counter()
        res, _ = evaluate(model, cfg)
        runs["llmq"].append((time.perf_counter() - t0, res.ppl.value, res.ppl.se, res.n_evaluated))
        if binary is None:
            continue
        cmd = [str(binary), "-m", model, "-f", str(text_file), "-c", str(ctx), "--chunks", str(chunks),
               "-t", str(threads)]  # fmt: skip
        t0 = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        wall = time.perf_counter() - t0
        m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", out.stdout + out.stderr)
        runs["llama-perplexity"].append((wall, float(m.group(1)), float(m.group(2)), chunks * ctx))
    row: dict = {"model": model, "ctx": ctx, "chunks": chunks, "threads": threads, "binary": str(binary)}
    for name, rs in runs.items():
        if rs:
            wall, ppl, se, n = min(rs)
            row[name] = {"ppl": ppl, "se": se, "seconds": wall, "tokens_per_s": n / wall}
    if binary is not None:
        row["ppl_rel_diff"] = row["llmq"]["ppl"] / row["llama-perplexity"]["ppl"] - 1
        row["speed_ratio"] = row["llmq"]["tokens_per_s"] / row["llama-perplexity"]["tokens_per_s"]
    return row


def plain_transformers_loop(model_dir: str, tokens: np.ndarray, ctx: int, chunks: int, threads: int) -> dict:
    """What one writes with transformers alone: a chunk per forward, every logit, no_grad."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    first = ctx // 2
    nll, count = 0.0, 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for c in range(chunks):
            ids = torch.from_numpy(tokens[c * ctx : (c + 1) * ctx].astype(np.int64))[None]
            logits = model(ids).logits[0]
            lp = torch.log_softmax(logits.float(), dim=-1)[first : ctx - 1]
            nll += float(-lp.gather(1, ids[0, first + 1 :, None]).double().sum())
            count += ctx - 1 - first
    seconds = time.perf_counter() - t0
    return {"ppl": math.exp(nll / count), "seconds": seconds, "tokens_per_s": chunks * ctx / seconds}


def hf_vs_plain_loop(
    hf_dir: str, text: str, ctx: int, chunks: int, threads: int, batch: int | None, repeat: int = 2
) -> dict:
    from llmq.eval.backends import TorchBackend

    be = TorchBackend(Path(hf_dir), threads=threads)
    tokens = be.tokenize(prepare_text(text))
    add_bos = be.add_bos
    be.close()
    if add_bos:
        raise SystemExit("this comparison assumes a vocabulary without BOS (as SmolLM2's)")
    cfg = PerplexityConfig(ctx=ctx, chunks=chunks, threads=threads, batch=batch)
    best_llmq, best_plain = None, None
    for _ in range(repeat):
        res, _ = evaluate(hf_dir, cfg, tokens=tokens)
        plain = plain_transformers_loop(hf_dir, tokens, ctx, chunks, threads)
        if best_llmq is None or res.seconds < best_llmq.seconds:
            best_llmq = res
        if best_plain is None or plain["seconds"] < best_plain["seconds"]:
            best_plain = plain
    llmq = {"ppl": best_llmq.ppl.value, "seconds": best_llmq.seconds, "tokens_per_s": best_llmq.tokens_per_s,
            "batch": batch or 4}  # fmt: skip
    return {"model": hf_dir, "ctx": ctx, "chunks": chunks, "threads": threads, "llmq": llmq,
            "transformers_loop": best_plain, "ppl_rel_diff": llmq["ppl"] / best_plain["ppl"] - 1,
            "speed_ratio": llmq["tokens_per_s"] / best_plain["tokens_per_s"]}  # fmt: skip


def kld_table(base: str, models: list[str], text_file: Path, ctx: int, chunks: int, threads: int) -> dict:
    cfg = PerplexityConfig(dataset=str(text_file), ctx=ctx, chunks=chunks, threads=threads)
    base_res, results = compare(models, cfg, base=base)
    rows = []
    for r in [base_res, *results]:
        k = r.kld
        rows.append({
            "model": Path(r.model).name, "size_mib": r.size_bytes / 2**20, "bpw": r.bits_per_weight,
            "ppl": r.ppl.value, "ppl_se": r.ppl.se,
            "dppl": k.ppl_diff.value if k else 0.0, "dppl_se": k.ppl_diff.se if k else 0.0,
            "kld": k.kld_mean.value if k else 0.0, "kld_se": k.kld_mean.se if k else 0.0,
            "kld_p99": k.kld_p99.value if k else 0.0,
            "same_top": k.same_top.value if k else 1.0, "same_top_se": k.same_top.se if k else 0.0,
        })  # fmt: skip
    return {"base": base, "ctx": ctx, "chunks": chunks, "n_scored": results[0].n_scored if results else 0,
            "rows": rows}  # fmt: skip


def markdown(report: dict) -> str:
    lines = [f"# Perplexity benchmark ({report['machine']})", ""]
    g = report.get("gguf")
    if g:
        lines += [f"## GGUF path: `{Path(g['model']).name}`, ctx {g['ctx']}, {g['chunks']} chunks, {g['threads']} threads",
                  "", "| tool | PPL | ± | wall s | tokens/s |", "|---|---:|---:|---:|---:|"]  # fmt: skip
        for name in ("llmq", "llama-perplexity"):
            if name in g:
                v = g[name]
                lines.append(
                    f"| {name} | {v['ppl']:.4f} | {v['se']:.4f} | {v['seconds']:.1f} | {v['tokens_per_s']:.1f} |"
                )
        if "speed_ratio" in g:
            lines += ["", f"PPL difference {100 * g['ppl_rel_diff']:+.4f}%; llmq/llama-perplexity throughput "
                      f"{g['speed_ratio']:.2f}x (end to end, model load and tokenization included)."]  # fmt: skip
        lines.append("")
    h = report.get("hf")
    if h:
        lines += [f"## HF path: ctx {h['ctx']}, {h['chunks']} chunks, {h['threads']} threads", "",
                  "| implementation | PPL | loop s | tokens/s |", "|---|---:|---:|---:|",
                  f"| llmq (batch {h['llmq']['batch']}) | {h['llmq']['ppl']:.5f} | {h['llmq']['seconds']:.1f} | "
                  f"{h['llmq']['tokens_per_s']:.1f} |",
                  f"| plain transformers loop | {h['transformers_loop']['ppl']:.5f} | "
                  f"{h['transformers_loop']['seconds']:.1f} | {h['transformers_loop']['tokens_per_s']:.1f} |", "",
                  f"PPL difference {100 * h['ppl_rel_diff']:+.5f}%; speed-up {h['speed_ratio']:.2f}x.", ""]  # fmt: skip
    t = report.get("table")
    if t:
        lines += [f"## PPL and KLD vs `{Path(t['base']).name}` (wikitext-2 test, ctx {t['ctx']}, "
                  f"first {t['chunks']} chunks = {t['n_scored']} scored tokens)", "",
                  "| model | MiB | bpw | PPL | ΔPPL | mean KLD | 99% KLD | same top % |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for r in t["rows"]:
            lines.append(
                f"| {r['model']} | {r['size_mib']:.1f} | {r['bpw']:.3f} | {r['ppl']:.4f} ± {r['ppl_se']:.4f} | "
                f"{r['dppl']:+.4f} ± {r['dppl_se']:.4f} | {r['kld']:.5f} ± {r['kld_se']:.5f} | "
                f"{r['kld_p99']:.4f} | {100 * r['same_top']:.2f} ± {100 * r['same_top_se']:.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default="smollm2", help="GGUF for the llama-perplexity comparison")
    ap.add_argument("--hf", help="HF checkpoint dir for the transformers comparison")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=None, help="llmq torch batch (windows per forward)")
    ap.add_argument("--table", nargs="*", default=None, help="base GGUF then the variants to compare with it")
    ap.add_argument("--table-chunks", type=int, default=8)
    ap.add_argument("--skip-gguf", action="store_true")
    ap.add_argument("--name", default="perplexity")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each side; the best is kept")
    args = ap.parse_args()

    text = load_eval_text("wikitext2")
    out_dir = ROOT / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    text_file = out_dir / ".wiki.test.raw"  # llama-perplexity reads a file; both sides get this one
    text_file.write_text(text)
    report: dict = {"machine": f"{platform.machine()}, {len(__import__('os').sched_getaffinity(0))} CPUs"}
    try:
        if not args.skip_gguf:
            report["gguf"] = gguf_vs_llama_perplexity(
                args.gguf, text_file, args.ctx, args.chunks, args.threads, args.repeat
            )
            print(json.dumps(report["gguf"], indent=1))
        if args.hf:
            report["hf"] = hf_vs_plain_loop(
                args.hf, text, args.ctx, args.chunks, args.threads, args.batch, args.repeat
            )
            print(json.dumps(report["hf"], indent=1))
        if args.table:
            base, *models = args.table
            report["table"] = kld_table(base, models, text_file, args.ctx, args.table_chunks, args.threads)
    finally:
        text_file.unlink(missing_ok=True)
    (out_dir / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / f"{args.name}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
