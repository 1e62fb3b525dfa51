"""Assemble docs/benchmarks.md from the tables the benchmark scripts wrote under benchmarks/results/."""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

SECTIONS = [
    ("convert", "Conversion: llmq convert vs llama.cpp convert_hf_to_gguf.py (issue 2)", "benchmarks/convert.py"),
    ("perplexity_gguf", "Perplexity, GGUF path: llmq vs llama-perplexity (issue 3)", "benchmarks/perplexity.py"),
    ("perplexity_hf", "Perplexity, HF path: llmq vs a plain transformers loop (issue 3)", "benchmarks/perplexity.py"),
    ("perplexity_table", "PPL and KLD of SmolLM2 GGUF types (issue 3)", "benchmarks/perplexity.py"),
    ("rtn_nf4", "RTN and NF4 on SmolLM2 (issue 4)", "benchmarks/rtn_nf4.py"),
    ("gguf_quant", "GGUF quantization vs llama.cpp's llama_model_quantize (issue 5)", "benchmarks/gguf_quant.py"),
    ("gguf_imatrix_kl", "Importance matrix: KL divergence with and without (issue 5)", "benchmarks/gguf_quant.py"),
    ("gptq_awq", "GPTQ and AWQ vs llm-compressor, full model, 128x512 calibration, current defaults (issue 6)", "benchmarks/gptq_awq.py --eval-chunks 16"),
    ("gptq_awq_64chunks", "The same GPTQ/AWQ runs scored on 64 wikitext-2 chunks (16,320 tokens) instead of 16 (issue 6)", "benchmarks/gptq_awq.py --eval-chunks 64 (reusing --work)"),
    ("gptq_full32", "GPTQ and AWQ, full model, 32x512 calibration, earlier defaults (issue 6)", "benchmarks/gptq_awq.py --nsamples 32"),
    ("estimate", "Memory estimator: speed and accuracy (issue 7)", "benchmarks/estimate.py"),
    ("budget", "Budgeted GGUF mixes vs llama.cpp's fixed ones (issue 17)", "benchmarks/budget.py"),
]  # fmt: skip


def main() -> None:
    out = [
        "# Benchmarks",
        "",
        "Every figure here was measured by the named script, which runs llmq and the peer side by side in one run",
        "on the same input and writes `benchmarks/results/NAME.{json,md}`; `python benchmarks/collect.py` rebuilds",
        "this page. Machine: 2 CPU cores, 24 GiB RAM, no GPU, unless a section says otherwise. Wall times on this",
        "shared machine vary by ±10–20% between runs; ratios from one run are the comparable figures.",
        "",
    ]
    for name, title, script in SECTIONS:
        md = RESULTS / f"{name}.md"
        js = RESULTS / f"{name}.json"
        out += [f"## {title}", "", f"Script: `{script}`.", ""]
        if js.exists():
            data = json.loads(js.read_text())
            meta = data.get("machine") if isinstance(data, dict) else None
            if isinstance(meta, dict):
                out += [f"Measured {meta.get('date', '')} on {meta.get('cpus', '?')} CPUs.", ""]
        out += [md.read_text().strip() if md.exists() else "_Not measured yet._", ""]
    (REPO / "docs" / "benchmarks.md").write_text("\n".join(out))


if __name__ == "__main__":
    main()
