"""The library behind the CLI: convert, quantize, inspect and size a model from Python.

python examples/python_api.py [WORKDIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import llmq

work = Path(sys.argv[1] if len(sys.argv) > 1 else "llmq-api-example")
work.mkdir(exist_ok=True)

hf = work / "smollm2-hf"
if not hf.exists():
    print(llmq.convert("smollm2", hf).to_dict())  # the packaged GGUF -> a Hugging Face checkpoint

q4 = work / "smollm2-Q4_K_M.gguf"
if not q4.exists():
    print(llmq.quantize(hf, q4, "gguf", type="Q4_K_M").to_dict())

rtn = work / "smollm2-rtn4"
if not rtn.exists():
    print(llmq.quantize(hf, rtn, "rtn", bits=4, group_size=64, format="compressed-tensors").to_dict())

report = llmq.inspect(q4)
print(
    f"{q4.name}: {report['summary']['bits_per_weight']:.3f} bits per weight, types {report['summary']['types']}"
)

est = llmq.estimate_memory(str(hf), quants=("bf16", "Q4_K_M", "nf4"), context=8192)
for r in est.results:
    print(r.quant, f"{r.total_bytes / 2**30:.2f} GiB")
