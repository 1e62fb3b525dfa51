"""Helpers of the estimator's accuracy tests and benchmark: llama.cpp's verbose log, a generated SWA GGUF."""

from __future__ import annotations

import contextlib
import io
import os
import re
import tempfile
from pathlib import Path


def llama_log(path: Path, **params) -> str:
    """Load a model + context with llama-cpp-python, verbose, and return what llama.cpp logged."""
    import llama_cpp

    py_log = io.StringIO()  # llama-cpp-python's log callback writes to sys.stderr, C code to fd 2: catch both
    with tempfile.TemporaryFile() as log, contextlib.redirect_stderr(py_log):
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)  # a file, not a pipe: llama.cpp logs more than a pipe buffer holds
        try:
            llm = llama_cpp.Llama(str(path), verbose=True, n_threads=1, n_batch=512, **params)
            model_size = llama_cpp.llama_model_size(llm.model)
            del llm
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        log.seek(0)
        text = log.read().decode(errors="replace") + py_log.getvalue()
    return text + f"\nllmq_model_size = {model_size}\n"


def parse_llama_log(log: str) -> dict[str, object]:
    model_buf = re.findall(r"CPU_Mapped model buffer size =\s*([\d.]+) MiB", log)
    kv = re.findall(r"llama_kv_cache: size =\s*[\d.]+ MiB \(\s*(\d+) cells.*K \((\w+)\):\s*([\d.]+) MiB, "
                    r"V \((\w+)\):\s*([\d.]+) MiB", log)  # fmt: skip
    compute = re.findall(r"CPU compute buffer size =\s*([\d.]+) MiB", log)
    return {
        "model_buffer": [float(x) for x in model_buf],
        "kv": [(int(c), tk, float(k), tv, float(v)) for c, tk, k, tv, v in kv],
        "model_size": int(re.search(r"llmq_model_size = (\d+)", log).group(1)),
        "output": float(re.search(r"output buffer size =\s*([\d.]+) MiB", log).group(1)),
        "compute": float(compute[0]) if compute else None,
    }


def make_swa_gguf(smollm2: Path, out: Path) -> Path:
    """A gemma2-architecture GGUF (sliding window on even layers) with mixed Q8_0/Q4_0/F16/F32 tensors and
    SmolLM2's tokenizer; zero weights (only loading is measured)."""
    import numpy as np

    from llmq.io import GGUFFileWriter, GGUFReader
    from llmq.io.base import TensorInfo
    from llmq.io.ggml_types import type_nbytes
    from llmq.io.gguf import gguf_kv_items

    n_layer, hidden, heads, kvh, hd, ffn = 4, 256, 4, 2, 64, 640
    with GGUFReader(smollm2) as src:
        meta, types = src.metadata, src.kv_types
        vocab = len(meta["tokenizer.ggml.tokens"])
        w = GGUFFileWriter(out, "gemma2")
        for key, value, vt, sub in gguf_kv_items(meta, types):
            if key.startswith("tokenizer."):
                w.add(key, value, vt, sub)
    for key, value in {"block_count": n_layer, "context_length": 8192, "embedding_length": hidden,
                       "feed_forward_length": ffn, "attention.head_count": heads, "attention.head_count_kv": kvh,
                       "attention.key_length": hd, "attention.value_length": hd, "attention.sliding_window": 128,
                       "attention.layer_norm_rms_epsilon": 1e-6}.items():  # fmt: skip
        w.add(f"gemma2.{key}", float(value) if "epsilon" in key else value)
    specs = [("token_embd.weight", "Q8_0", (vocab, hidden)), ("output_norm.weight", "F32", (hidden,))]
    for i in range(n_layer):
        b = f"blk.{i}."
        specs += [(b + "attn_norm.weight", "F32", (hidden,)), (b + "attn_q.weight", "Q4_0", (heads * hd, hidden)),
                  (b + "attn_k.weight", "F16", (kvh * hd, hidden)), (b + "attn_v.weight", "Q8_0", (kvh * hd, hidden)),
                  (b + "attn_output.weight", "Q4_0", (hidden, heads * hd)),
                  (b + "post_attention_norm.weight", "F32", (hidden,)), (b + "ffn_norm.weight", "F32", (hidden,)),
                  (b + "ffn_gate.weight", "Q4_0", (ffn, hidden)), (b + "ffn_up.weight", "Q8_0", (ffn, hidden)),
                  (b + "ffn_down.weight", "F16", (hidden, ffn)), (b + "post_ffw_norm.weight", "F32", (hidden,))]  # fmt: skip
    infos = [TensorInfo(n, t, s, type_nbytes(t, s)) for n, t, s in specs]
    w.plan(infos)
    for info in infos:
        w.write(info.name, np.zeros(info.nbytes, dtype=np.uint8))
    w.close()
    return out
