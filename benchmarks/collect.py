"""Assemble docs/benchmarks.md from the tables the benchmark scripts wrote under benchmarks/results/."""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

SECTIONS = [
    ("convert", "Conversion: llmq convert vs llama.cpp convert_hf_to_gguf.py", "benchmarks/convert.py"),
    ("perplexity", "Perplexity evaluator: throughput vs llama-perplexity and a plain transformers loop", "benchmarks/perplexity.py"),
    ("quality", "Quality of every method on SmolLM2-135M (wikitext-2 test)", "benchmarks/perplexity.py --table"),
    ("rtn_nf4", "RTN and NF4", "benchmarks/rtn_nf4.py"),
    ("gguf_quant", "GGUF quantization vs llama.cpp's llama_model_quantize", "benchmarks/gguf_quant.py"),
    ("gptq_awq", "GPTQ and AWQ vs llm-compressor", "benchmarks/gptq_awq.py"),
    ("estimate", "Memory estimator: speed and accuracy", "benchmarks/estimate.py"),
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
            meta = json.loads(js.read_text()).get("machine")
            if meta:
                out += [f"Measured {meta.get('date', '')} on {meta.get('cpus', '?')} CPUs.", ""]
        out += [md.read_text().strip() if md.exists() else "_Not measured yet._", ""]
    (REPO / "docs" / "benchmarks.md").write_text("\n".join(out))


if __name__ == "__main__":
    main()
