"""Engine rules beyond the KV cache: how weights are laid out in memory and the runtime overhead terms.

Every overhead term is named, has a formula and says whether it is an engine rule (exact, from the engine's
source) or an assumption (a typical figure; the docs say where it comes from). There is no blanket percentage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from llmq.estimate.arch import ModelArch
from llmq.estimate.hardware import GPU, MiB

ENGINES = ("transformers", "vllm", "llama.cpp")

# Assumptions, each documented in docs/estimate.md
CUDA_CONTEXT_TORCH = 500 * MiB  # CUDA context + cuBLAS/cuDNN handles and workspace of a torch process
CUDA_CONTEXT_GGML = 300 * MiB  # CUDA context of a ggml-cuda process (no torch, no cuDNN)
VLLM_CUDA_GRAPHS = 512 * MiB  # vLLM's CUDA-graph capture pool (its log: "Graph capturing ... took ~0.5 GiB")
VLLM_NCCL = 256 * MiB  # NCCL communicators and buffers, per rank, when tp > 1
VLLM_MAX_BATCHED_TOKENS = 8192  # vLLM V1 default chunked-prefill budget (the profile run's batch)
VLLM_MAX_NUM_SEQS = 256
VLLM_GPU_MEMORY_UTILIZATION = 0.9
FRAGMENTATION = 0.10  # torch caching allocator slack on dynamic allocations (KV + activations)
LLAMA_CPP_ALIGNMENT = 32


@dataclass
class Term:
    name: str
    nbytes: int
    formula: str
    kind: str  # "exact" (from headers / an engine rule) | "assumption" | "approximation"

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "bytes": self.nbytes, "formula": self.formula, "kind": self.kind}


def gguf_file_span(sizes: Sequence[int], alignment: int = LLAMA_CPP_ALIGNMENT) -> int:
    """Bytes from the first tensor's start to the last one's end in a GGUF data section (each tensor aligned)."""
    if not sizes:
        return 0
    return sum(-(-s // alignment) * alignment for s in sizes[:-1]) + sizes[-1]


def vllm_vocab_padding(a: ModelArch, dtype_bytes: int, tp: int) -> Term:
    """vLLM pads embedding and lm_head rows to a multiple of 64 (per TP rank) for VocabParallelEmbedding."""
    padded = -(-a.vocab // (64 * tp)) * 64 * tp
    n_mats = 1 if a.tied_embeddings else 2
    extra = (padded - a.vocab) * a.hidden * dtype_bytes * n_mats // tp
    return Term("vocab padding", extra, f"(pad64·tp({a.vocab}) = {padded} − {a.vocab}) × hidden {a.hidden} × "
                f"{dtype_bytes} B × {n_mats} matrices / tp {tp}", "exact")  # fmt: skip


def overhead_terms(engine: str, a: ModelArch, gpu: GPU | None, context: int, batch: int, tp: int,
                   dyn_bytes: int, *, n_ubatch: int = 512, flash_attn: bool = True) -> list[Term]:  # fmt: skip
    """Runtime terms on one GPU besides weights and KV. ``dyn_bytes``: KV bytes (for the fragmentation term)."""
    act = 2 if a.dtype in ("F16", "BF16") else 4
    cuda = gpu is not None and not gpu.unified
    terms: list[Term] = []
    if engine == "transformers":
        if cuda:
            terms.append(Term("CUDA context", CUDA_CONTEXT_TORCH, "500 MiB (torch CUDA context + cuBLAS workspace)",
                              "assumption"))  # fmt: skip
        terms.append(
            Term("logits buffer", batch * a.vocab * 4, f"batch {batch} × vocab {a.vocab} × 4 B", "exact")
        )
        peak = batch * context * (2 * a.ffn + 4 * a.hidden) * act
        terms.append(Term("prefill activations", peak, f"batch {batch} × ctx {context} × (2·ffn {a.ffn} + "
                          f"4·hidden {a.hidden}) × {act} B (one layer's live tensors, SDPA attention)",
                          "approximation"))  # fmt: skip
        frag = int(FRAGMENTATION * (peak + dyn_bytes))
        terms.append(Term("fragmentation allowance", frag, "10% × (KV + activations): caching-allocator slack",
                          "assumption"))  # fmt: skip
    elif engine == "vllm":
        if cuda:
            terms.append(Term("CUDA context", CUDA_CONTEXT_TORCH, "500 MiB (torch CUDA context + cuBLAS workspace)",
                              "assumption"))  # fmt: skip
            terms.append(
                Term("CUDA graphs", VLLM_CUDA_GRAPHS, "512 MiB (captured decode graphs)", "assumption")
            )
        if tp > 1:
            terms.append(Term("NCCL buffers", VLLM_NCCL, "256 MiB per rank when tp > 1", "assumption"))
        tokens = max(VLLM_MAX_BATCHED_TOKENS, min(context * batch, VLLM_MAX_BATCHED_TOKENS))
        peak = tokens * (2 * a.ffn // tp + 4 * a.hidden) * act
        terms.append(Term("profile-run activations", peak, f"max_num_batched_tokens {tokens} × (2·ffn {a.ffn}/tp "
                          f"{tp} + 4·hidden {a.hidden}) × {act} B", "approximation"))  # fmt: skip
        seqs = VLLM_MAX_NUM_SEQS
        terms.append(Term("logits buffer", seqs * a.vocab * 4, f"max_num_seqs {seqs} × vocab {a.vocab} × 4 B",
                          "exact"))  # fmt: skip
    elif engine == "llama.cpp":
        if cuda:
            terms.append(Term("CUDA context", CUDA_CONTEXT_GGML, "300 MiB (ggml-cuda context)", "assumption"))
        terms.append(
            Term("output buffer", a.vocab * batch * 4, f"vocab {a.vocab} × n_seq_max {batch} × 4 B", "exact")
        )
        terms.append(llama_cpp_compute_buffer(a, context, batch, n_ubatch, flash_attn))
    return terms


def llama_cpp_compute_buffer(a: ModelArch, context: int, batch: int, n_ubatch: int, flash_attn: bool) -> Term:
    """ggml's graph allocator reuses memory between ops, so the compute buffer is about the live set at the
    graph's output: the worst-case micro-batch's logits plus a few hidden-state rows. Measured against
    llama.cpp's log (benchmarks/estimate.py): within 3.5% for SmolLM2 and a Gemma-2-style model with flash
    attention; without flash attention llama.cpp reserves less than this (the term then over-estimates)."""
    ub = min(n_ubatch, -(-context * batch // 256) * 256)
    total = a.vocab * ub * 4 + 3 * ub * a.hidden * 4
    return Term("compute buffer", total, f"vocab {a.vocab} × n_ubatch {ub} × 4 + 3 × n_ubatch × hidden {a.hidden} × 4",
                "approximation")  # fmt: skip
