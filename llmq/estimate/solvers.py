"""Solvers over a memory function, and the roofline arithmetic (FLOPs, bandwidth bounds) users ask for.

``fn(context, batch, n_gpus) -> bytes on one GPU`` is non-decreasing in context and batch (engines only round
up), so the largest context / batch that fits is found by doubling then bisecting.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llmq.errors import LlmqError
from llmq.estimate.arch import RECURRENT, SWA, ModelArch
from llmq.estimate.hardware import GPU

MemFn = Callable[[int, int, int], int]
MAX_CONTEXT = 1 << 24
MAX_BATCH = 1 << 20
GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64)


def _largest(ok: Callable[[int], bool], cap: int) -> int:
    """Largest n in [1, cap] with ok(n), assuming ok is monotone (True then False); 0 if ok(1) is False."""
    try:
        if not ok(1):
            return 0
    except LlmqError:
        return 0
    lo, hi = 1, 2
    while hi <= cap and ok(hi):
        lo, hi = hi, hi * 2
    if hi > cap:
        return cap if ok(cap) else _bisect(ok, lo, cap)
    return _bisect(ok, lo, hi)


def _bisect(ok: Callable[[int], bool], lo: int, hi: int) -> int:
    # invariant: ok(lo), not ok(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo


def max_context(fn: MemFn, budget: int, batch: int, n_gpus: int) -> int:
    """Largest context (tokens per sequence) whose total fits the budget on one GPU."""
    return _largest(lambda c: fn(c, batch, n_gpus) <= budget, MAX_CONTEXT)


def max_sequences(fn: MemFn, budget: int, context: int, n_gpus: int) -> int:
    """Largest number of concurrent sequences of ``context`` tokens that fits."""
    return _largest(lambda b: fn(context, b, n_gpus) <= budget, MAX_BATCH)


def gpus_needed(fn: MemFn, budget: int, context: int, batch: int, engine: str, n_heads: int) -> int | None:
    """Fewest GPUs (of the same kind) whose per-GPU share fits; vLLM's TP must divide the attention heads."""
    for n in GPU_COUNTS:
        if engine == "vllm" and n_heads and n_heads % n:
            continue
        try:
            if fn(context, batch, n) <= budget:
                return n
        except LlmqError:
            continue
    return None


def matmul_params(a: ModelArch, active_params: int) -> int:
    """Parameters that take part in a matmul per token: all active ones but the embedding lookup (the lm_head
    matmul counts, also when it shares the embedding matrix)."""
    embed = a.vocab * a.hidden
    return active_params - embed + (embed if a.tied_embeddings else 0)


def attention_flops(a: ModelArch, context: int) -> int:
    """FLOPs of QKᵀ and AV for one new token attending to ``context`` cached tokens, all layers."""
    d_qk = a.kv_lora_rank + a.qk_rope_head_dim if a.is_mla else a.head_dim_k
    d_v = a.kv_lora_rank if a.is_mla else a.head_dim_v
    total = 0
    for kind in a.layer_kinds:
        if kind == RECURRENT:
            continue
        n = min(context, a.sliding_window) if kind == SWA and a.sliding_window else context
        total += 2 * a.n_heads * (d_qk + d_v) * n
    return total


def performance(a: ModelArch, gpu: GPU, active_params: int, active_bytes: int, kv_bytes_one_seq: int,
                context: int, batch: int, n_gpus: int) -> dict[str, Any]:  # fmt: skip
    """Roofline figures per GPU kind; n_gpus share the work ideally (tensor parallel, no communication)."""
    mm = matmul_params(a, active_params)
    flops_token = 2 * mm + attention_flops(a, context)
    out: dict[str, Any] = {
        "flops_per_token": flops_token,
        "flops_per_token_formula": f"2 × matmul params {mm} + attention Σ_layers 2·heads·(d_qk+d_v)·ctx {context}",
    }
    if gpu.flops and gpu.bandwidth:
        # decode at batch b does 2·mm·b FLOPs per read of the weights: compute-bound once b exceeds this
        out["crossover_batch"] = gpu.flops * active_bytes / (2 * mm * gpu.bandwidth)
        out["crossover_formula"] = "(FLOP/s ÷ bytes/s) × weight bytes ÷ (2 × matmul params)"
    if gpu.bandwidth:
        read = active_bytes + kv_bytes_one_seq * batch
        out["decode_latency_s"] = read / (gpu.bandwidth * n_gpus)
        out["decode_latency_formula"] = (f"(active weight bytes {active_bytes} + KV bytes {kv_bytes_one_seq} × batch "
                                         f"{batch}) ÷ (bandwidth × {n_gpus} GPUs)")  # fmt: skip
        out["decode_tokens_per_s_bound"] = (
            batch / out["decode_latency_s"] if out["decode_latency_s"] else None
        )
    if gpu.flops:
        prompt = batch * (context * 2 * mm + attention_flops(a, context) * context // 2)
        out["prefill_flops"] = prompt
        out["prefill_time_s"] = prompt / (gpu.flops * n_gpus)
        out["prefill_formula"] = (
            "batch × (ctx × 2 × matmul params + causal attention ≈ attn(ctx) × ctx / 2) ÷ FLOP/s"
        )
    return out
