"""Budgeted GGUF mixes against llama.cpp's fixed ones, and the sensitivity proxy against true KLD, on SmolLM2.

    python benchmarks/budget.py [--workdir /tmp/llmq-budget-bench] [--chunks 4] [--nsamples 8]

1. SmolLM2-135M (the packaged Q4_1 GGUF dequantized to f32) and one imatrix (pydoc calibration, timed);
2. the fixed mixes Q3_K_M, Q4_K_M, Q5_K_M with that imatrix; for each, a budgeted file with ``--target-size``
   equal to the fixed file's exact size; every file scored by ``llmq eval perplexity`` (llama.cpp backend,
   wikitext-2 test, ``--chunks`` windows of 512) against the f32 model: mean KLD, PPL, size;
3. proxy validation: one tensor at a time quantized (all others f32, replayed through ``--recipe``), its true
   KLD against its proxy loss; Spearman rank correlation; the median KLD/proxy ratio turns the budgeted files'
   proxy loss into a predicted KLD.

Candidate types: Q2_K, Q3_K, Q4_K, Q6_K, Q8_0, Q4_0, Q5_0. SmolLM2's weights come from a Q4_1 GGUF, so Q4_1 and
Q5_1 (whose grids contain every Q4_1 value) reproduce them almost exactly: they are left out, and so is Q5_K,
which falls back to Q5_1 on SmolLM2's 576-wide rows. (The fixed Q5_K_M does use Q5_1 there: its KLD is
flattered.) Results: benchmarks/results/budget.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

TYPES = "Q2_K,Q3_K,Q4_K,Q6_K,Q8_0,Q4_0,Q5_0"
FIXED = ("Q3_K_M", "Q4_K_M", "Q5_K_M")
# (tensor, type) pairs of the proxy validation: early/middle/late layers, each matrix kind, two widths
PAIRS = [
    ("blk.0.ffn_down.weight", "Q2_K"), ("blk.0.ffn_down.weight", "Q4_K"), ("blk.15.ffn_down.weight", "Q2_K"),
    ("blk.29.ffn_down.weight", "Q2_K"), ("blk.29.ffn_down.weight", "Q4_K"), ("blk.0.attn_v.weight", "Q4_0"),
    ("blk.15.attn_v.weight", "Q4_0"), ("blk.0.attn_q.weight", "Q4_0"), ("blk.15.attn_k.weight", "Q4_0"),
    ("blk.15.attn_output.weight", "Q4_0"), ("blk.2.ffn_up.weight", "Q4_0"), ("blk.15.ffn_gate.weight", "Q4_0"),
    ("blk.29.ffn_up.weight", "Q4_0"), ("blk.29.attn_output.weight", "Q4_0"), ("blk.29.ffn_gate.weight", "Q5_0"),
    ("blk.7.ffn_down.weight", "Q3_K"),
]  # fmt: skip


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(v: list[float]) -> np.ndarray:
        v_arr = np.asarray(v, dtype=np.float64)
        order = np.argsort(v_arr, kind="stable")
        r = np.empty(len(v_arr))
        r[order] = np.arange(len(v_arr), dtype=np.float64)
        for x in np.unique(v_arr):  # ties: mean rank
            m = v_arr == x
            r[m] = r[m].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/llmq-budget-bench")
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--pairs", type=int, default=len(PAIRS))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "budget"))
    a = ap.parse_args()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)

    from gguf_quant import smollm2_f32

    from llmq import api
    from llmq.eval.perplexity import PerplexityConfig
    from llmq.io.gguf import GGUFReader
    from llmq.quant.gguf.imatrix import imatrix_from_calibration, save_imatrix
    from llmq.quant.gguf.quantizer import GGUFQuantConfig, GGUFQuantizer

    src = smollm2_f32(work / "smollm2-f32.gguf")
    imfile, imjson = work / "imatrix.gguf", work / "imatrix.json"
    if not imjson.exists():
        t0 = time.perf_counter()
        save_imatrix(imatrix_from_calibration(src, "pydoc", nsamples=a.nsamples, seqlen=512), imfile)
        imjson.write_text(json.dumps({"imatrix_seconds": time.perf_counter() - t0, "chunks": a.nsamples}))
    t_imatrix = json.loads(imjson.read_text())["imatrix_seconds"]
    cfg = PerplexityConfig(chunks=a.chunks, ctx=512, backend="llamacpp")
    base = work / "base-f32.logits"
    if not base.exists():
        api.compare_perplexity([str(src)], cfg, save_base=base)
    numel = sum(t.numel for t in GGUFReader(src, decode_strings=False).infos())

    def score(path: Path) -> dict:
        r = api.compare_perplexity([str(path)], cfg, base=str(base)).results[0]
        with GGUFReader(path, decode_strings=False) as rd:
            tb = sum(t.nbytes for t in rd.infos())
        return {"file_bytes": path.stat().st_size, "bpw": round(8 * tb / numel, 4),
                "kld": r.kld.kld_mean.value, "kld_se": r.kld.kld_mean.se, "ppl": r.ppl.value}  # fmt: skip

    q = GGUFQuantizer()
    # --- proxy validation: one tensor at a time
    with GGUFReader(src, decode_strings=False) as rd:
        all_f32 = {t.name: t.dtype for t in rd.infos()}
    sens_run = work / "sens.gguf"
    q.run(
        src, sens_run, GGUFQuantConfig(imatrix=str(imfile), target_bpw=30.0, budget_types=TYPES), force=True
    )
    sens_recipe = json.loads(Path(str(sens_run) + ".recipe.json").read_text())
    t_measure = sens_recipe["predicted"]["measure_seconds"]
    sens = sens_recipe["sensitivity"]
    pairs = []
    for name, ty in PAIRS[: a.pairs]:
        rec = work / "one.json"
        rec.write_text(json.dumps({"base_type": "F32", "types": {**all_f32, name: ty}}))
        out = work / "one.gguf"
        q.run(src, out, GGUFQuantConfig(imatrix=str(imfile), recipe=str(rec)), force=True)
        s = score(out)
        out.unlink()
        pairs.append(
            {"tensor": name, "type": ty, "proxy": sens[name][ty], "kld": s["kld"], "kld_se": s["kld_se"]}
        )
        print(json.dumps(pairs[-1]), flush=True)
    rho = spearman([p["proxy"] for p in pairs], [p["kld"] for p in pairs])
    alpha = float(np.median([p["kld"] / p["proxy"] for p in pairs if p["proxy"] > 0]))

    # --- fixed mixes and budgeted files of the same size
    rows = []
    for ft in FIXED:
        fixed = work / f"{ft}.gguf"
        q.run(src, fixed, GGUFQuantConfig(type=ft, imatrix=str(imfile)), force=True)
        sf = score(fixed)
        bud = work / f"budget-{ft}.gguf"
        t0 = time.perf_counter()
        q.run(src, bud, GGUFQuantConfig(imatrix=str(imfile), target_size=str(sf["file_bytes"]), budget_types=TYPES),
              force=True)  # fmt: skip
        t_bud = time.perf_counter() - t0
        rec = json.loads(Path(str(bud) + ".recipe.json").read_text())
        sb = score(bud)
        t0 = time.perf_counter()
        replay = work / f"replay-{ft}.gguf"
        q.run(src, replay, GGUFQuantConfig(imatrix=str(imfile), recipe=str(bud) + ".recipe.json"), force=True)
        t_replay = time.perf_counter() - t0
        same = replay.read_bytes() == bud.read_bytes()
        row = {"size_of": ft, "fixed": sf, "budget": sb, "kld_ratio": round(sb["kld"] / sf["kld"], 3),
               "size_diff_pct": round(100 * (sb["file_bytes"] / sf["file_bytes"] - 1), 3),
               "proxy_loss": rec["predicted"]["proxy_loss"], "predicted_kld": alpha * rec["predicted"]["proxy_loss"],
               "optimal": rec["predicted"]["optimal"], "budget_seconds": round(t_bud, 1),
               "replay_seconds": round(t_replay, 1), "replay_identical": same,
               "types": {t: list(rec["types"].values()).count(t) for t in sorted(set(rec["types"].values()))}}  # fmt: skip
        print(json.dumps(row), flush=True)
        rows.append(row)
        for p in (fixed, bud, replay):
            p.unlink()
    meta = {"model": "SmolLM2-135M-Instruct (f32 from the Q4_1 GGUF)", "calibration": "pydoc, "
            f"{a.nsamples} chunks of 512", "eval": f"llmq eval perplexity, llama.cpp backend, wikitext-2 test, "
            f"{a.chunks} windows of 512, KLD against f32", "candidate_types": TYPES,
            "imatrix_seconds": round(t_imatrix, 1), "measure_seconds": round(t_measure, 1),
            "measure_over_imatrix": round(t_measure / t_imatrix, 3), "spearman": round(rho, 3),
            "kld_per_proxy": alpha, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}  # fmt: skip
    Path(a.out + ".json").write_text(
        json.dumps({"meta": meta, "pairs": pairs, "rows": rows}, indent=1) + "\n"
    )
    md = [f"{meta['model']}; imatrix: {meta['calibration']}; {meta['eval']}.", "",
          "| size of | file MiB | bpw fixed | bpw budget | KLD fixed | KLD budget | ratio | predicted KLD | "
          "PPL fixed | PPL budget |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        f, b = r["fixed"], r["budget"]
        md.append(f"| {r['size_of']} | {f['file_bytes'] / 2**20:.2f} / {b['file_bytes'] / 2**20:.2f} | {f['bpw']} | "
                  f"{b['bpw']} | {f['kld']:.4f} ± {f['kld_se']:.4f} | {b['kld']:.4f} ± {b['kld_se']:.4f} | "
                  f"{r['kld_ratio']} | {r['predicted_kld']:.4f} | {f['ppl']:.3f} | {b['ppl']:.3f} |")  # fmt: skip
    md += ["", f"Proxy validation ({len(pairs)} single-tensor files): Spearman ρ = {rho:.3f} between proxy loss "
           f"and true KLD. Sensitivity pass {t_measure:.1f} s = {t_measure / t_imatrix:.3f}× the imatrix "
           f"computation ({t_imatrix:.1f} s).", "", "| tensor | type | proxy | KLD |", "|---|---|---|---|"]  # fmt: skip
    md += [
        f"| {p['tensor']} | {p['type']} | {p['proxy']:.4g} | {p['kld']:.5f} ± {p['kld_se']:.5f} |"
        for p in pairs
    ]
    Path(a.out + ".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
