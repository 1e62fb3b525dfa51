"""RTN int4 g64, RTN int8 and NF4 (with and without double quant) on SmolLM2-135M-Instruct.

For each: time to quantize and peak RSS (each run in its own process), size on disk, and perplexity and KL
divergence against the unquantized model on wikitext-2 test (../shared/data), all loaded with llmq's
``load_causal_lm``. Evaluation follows llama-perplexity's protocol: chunks of ``--ctx`` tokens, no BOS (SmolLM2's
GGUF does not add one), only the second half of each chunk scored; ``--chunks`` limits how many chunks (the whole
file is ~580 chunks of 512; CPU time on this 2-core machine is the limit), so the figures are over the first N.

    python benchmarks/rtn_nf4.py --model /path/to/smollm2-hf [--chunks 6] [--out benchmarks/results]

The model directory must come from ``llmq convert SmolLM2-135M-Instruct.Q4_1.gguf DIR --outtype bf16``.
Writes benchmarks/results/rtn_nf4.json and rtn_nf4.md.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import peak_rss_bytes  # noqa: E402

RUNS = {
    "rtn-int4-g64": ("rtn", {"format": "compressed-tensors", "bits": 4, "group_size": 64, "sym": True}),
    "rtn-int8": ("rtn", {"format": "compressed-tensors", "bits": 8, "group_size": -1, "sym": True}),
    "nf4": ("nf4", {"double_quant": False}),
    "nf4-dq": ("nf4", {"double_quant": True}),
}


def quantize_child(method: str, options: dict, src: str, out: str) -> None:
    """Runs in a fresh process: quantize, then report seconds and this process's peak RSS as JSON."""
    from llmq.quant.layerwise.nf4 import NF4Config, NF4Quantizer
    from llmq.quant.layerwise.rtn import RTNConfig, RTNQuantizer

    q, cfg_cls = (RTNQuantizer(), RTNConfig) if method == "rtn" else (NF4Quantizer(), NF4Config)
    t0 = time.perf_counter()
    res = q.run(Path(src), Path(out), cfg_cls.from_options(method, options), force=True)
    secs = time.perf_counter() - t0
    rss = peak_rss_bytes()
    print(json.dumps({"seconds": secs, "peak_rss_bytes": rss, "output_bytes": res.output_bytes}))


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def tokens(model_dir: Path, text: str) -> list[int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(text, add_special_tokens=False).ids


def chunk_logprobs(model, ids, ctx: int, n_chunks: int):
    """Per chunk: log-softmax of the scored half (positions ctx/2 .. ctx-2 predicting the next token)."""
    import torch

    first = ctx // 2
    with torch.no_grad():
        for c in range(n_chunks):
            chunk = torch.tensor(ids[c * ctx : (c + 1) * ctx]).unsqueeze(0)
            logits = model(chunk).logits[0, first : ctx - 1].float()
            yield torch.log_softmax(logits, dim=-1), chunk[0, first + 1 : ctx]


def evaluate(model_dir: Path, base_dir: Path, ids: list[int], ctx: int, n_chunks: int, base_cache: list):
    """PPL of the model and, against the base model's log-probs, mean KLD, 99th percentile and same-top-1."""
    import torch

    from llmq.models.load import load_causal_lm

    model = load_causal_lm(model_dir)
    nll, kls, same, n = 0.0, [], 0, 0
    for c, (lp, target) in enumerate(chunk_logprobs(model, ids, ctx, n_chunks)):
        nll -= float(lp.gather(1, target[:, None]).sum())
        n += target.numel()
        if base_cache is not None and len(base_cache) > c:
            blp = base_cache[c].float()
            kls.append((blp.exp() * (blp - lp)).sum(-1))
            same += int((blp.argmax(-1) == lp.argmax(-1)).sum())
        elif base_cache is not None:
            base_cache.append(lp.half())  # fp16 log-probs: the base distribution for KLD at half the memory
    del model
    out = {"ppl": math.exp(nll / n), "tokens_scored": n}
    if kls:
        k = torch.cat(kls)
        out.update(kld_mean=float(k.mean()), kld_p99=float(k.quantile(0.99)), same_top1=same / k.numel())
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--chunks", type=int, default=6)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--work", type=Path, default=Path("/tmp/llmq-bench-rtn"))
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        method, opts, src, out = a.child
        return quantize_child(method, json.loads(opts), src, out)

    import torch

    from llmq.calib.sources import load_text

    torch.set_num_threads(2)
    a.work.mkdir(parents=True, exist_ok=True)
    ids = tokens(a.model, load_text("wikitext2", "test"))
    n_chunks = min(a.chunks, len(ids) // a.ctx)
    base_cache: list = []
    results = {"model": a.model.name, "ctx": a.ctx, "chunks": n_chunks, "total_chunks": len(ids) // a.ctx,
               "runs": {}}  # fmt: skip
    base = evaluate(a.model, a.model, ids, a.ctx, n_chunks, base_cache)
    results["runs"]["bf16 (unquantized)"] = {"output_bytes": dir_bytes(a.model), **base}
    print("base", base, flush=True)
    for name, (method, opts) in RUNS.items():
        out = a.work / name
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, __file__, "--model", str(a.model), "--child", method, json.dumps(opts),
               str(a.model), str(out)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        q = json.loads(proc.stdout.strip().splitlines()[-1])
        ev = evaluate(out, a.model, ids, a.ctx, n_chunks, base_cache)
        results["runs"][name] = {"method": method, "options": opts, **q, "output_bytes": dir_bytes(out), **ev}
        print(name, results["runs"][name], flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "rtn_nf4.json").write_text(json.dumps(results, indent=2) + "\n")
    (a.out / "rtn_nf4.md").write_text(markdown(results))


def markdown(r: dict) -> str:
    head = (f"# RTN / NF4 on {r['model']}\n\nwikitext-2 test, llama.cpp protocol (ctx {r['ctx']}, second half of "
            f"each chunk scored), first {r['chunks']} of {r['total_chunks']} chunks; KLD against the bf16 model. "
            "Quantization time and peak RSS from a fresh process per run (2 shared CPU cores).\n\n"
            "| run | quantize s | peak RSS MiB | size MiB | PPL | mean KLD | KLD p99 | same top-1 |\n"
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n")  # fmt: skip
    rows = []
    for name, v in r["runs"].items():
        rows.append(
            f"| {name} | {v.get('seconds', 0):.1f} | {v.get('peak_rss_bytes', 0) / 2**20:.0f} | "
            f"{v['output_bytes'] / 2**20:.1f} | {v['ppl']:.3f} | {v.get('kld_mean', 0):.4f} | "
            f"{v.get('kld_p99', 0):.4f} | {100 * v.get('same_top1', 1):.1f}% |"
        )
    return head + "\n".join(rows) + "\n"


if __name__ == "__main__":
    main()
