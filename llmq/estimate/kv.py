"""KV cache and recurrent state, per token and in total, under each engine's allocation rules.

Per layer and cached token the cache holds K and V rows: ``n_kv_heads × head_dim`` elements each (GQA), or one
``kv_lora_rank + qk_rope_head_dim`` latent row and no V (MLA). Sliding-window layers hold at most the window.
Recurrent layers (Mamba, gated delta net) hold a fixed conv + SSM state per sequence instead.

Engines differ in how many cells they allocate:

- transformers (DynamicCache): exactly the tokens seen, per sequence; SWA layers keep ``min(ctx, window)``.
- vLLM (PagedAttention): blocks of 16 tokens, ``⌈ctx/16⌉`` blocks per sequence (SWA layers
  ``⌈window/16⌉ + 1``); per rank ``max(1, kv_heads // tp)`` heads — replicated when TP exceeds the KV heads;
  MLA's latent is replicated on every rank.
- llama.cpp: ``n_ctx`` padded to 256 cells per sequence stream; SWA layers
  ``pad256(min(n_ctx, n_swa·n_seq_unified + n_ubatch))`` — or the full n_ctx with ``swa_full``, which is the
  default of the library (llama_context_default_params, llama-cpp-python) but not of llama-server/llama-cli; K and V rows in ggml types (q8_0/q4_0 rows are
  blocks of 32 elements: 34 and 18 bytes); quantized V only with flash attention.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmq.errors import BadInput
from llmq.estimate.arch import RECURRENT, SWA, ModelArch
from llmq.io.ggml_types import GGML_TYPES

# the KV cache types (--kv-cache-dtype) that are ggml types, by their llama.cpp names
GGML_CACHE_NAMES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1",
                    "q5_0": "Q5_0", "q5_1": "Q5_1", "iq4_nl": "IQ4_NL"}  # fmt: skip
# cache type -> (block size, bytes per block): the ggml ones from llmq.io.ggml_types, plus vLLM's fp8 (one byte)
CACHE_TYPES: dict[str, tuple[int, int]] = {
    **{name: GGML_TYPES[ggml][1:] for name, ggml in GGML_CACHE_NAMES.items()},
    "fp8": (1, 1),
}
_MODEL_DTYPE_CACHE = {"F32": "f32", "F16": "f16", "BF16": "bf16"}

VLLM_BLOCK = 16
LLAMA_CPP_PAD = 256


def pad(n: int, to: int) -> int:
    return -(-n // to) * to


def row_bytes(cache_type: str, n: int) -> int:
    block, size = CACHE_TYPES[cache_type]
    if n % block:
        raise BadInput(f"KV cache type {cache_type} needs rows that are multiples of {block}, got {n}")
    return n // block * size


@dataclass
class KVLayout:
    """What the cache of one configuration holds, in bytes (for the whole batch, on one GPU/rank)."""

    k_bytes: int
    v_bytes: int
    state_bytes: int  # recurrent conv + SSM state
    per_token_bytes: int  # K+V one more token of context adds to one sequence (full-attention layers)
    cells: int  # cells allocated per sequence in full-attention layers
    swa_cells: int  # ... in sliding-window layers
    formula: str
    cache_type_k: str
    cache_type_v: str

    @property
    def total(self) -> int:
        return self.k_bytes + self.v_bytes + self.state_bytes


def resolve_cache_type(engine: str, requested: str | None, model_dtype: str) -> str:
    default = _MODEL_DTYPE_CACHE.get(model_dtype, "f16") if engine != "llama.cpp" else "f16"
    t = (requested or default).lower()
    if t == "auto":
        t = default
    if t not in CACHE_TYPES:
        raise BadInput(f"unknown --kv-cache-dtype {requested!r}; use f16, bf16, fp8, q8_0 or q4_0")
    allowed = {"transformers": {"f32", "f16", "bf16"}, "vllm": {"f16", "bf16", "fp8", "f32"},
               "llama.cpp": set(CACHE_TYPES) - {"fp8"}}[engine]  # fmt: skip
    if t not in allowed:
        raise BadInput(
            f"--kv-cache-dtype {t} is not supported by {engine} (it takes {', '.join(sorted(allowed))})"
        )
    return t


def kv_layout(a: ModelArch, engine: str, context: int, batch: int, cache_k: str, cache_v: str, *,
              tp: int = 1, n_ubatch: int = 512, flash_attn: bool = True, swa_full: bool = True,
              state_type: str | None = None) -> KVLayout:  # fmt: skip
    """Bytes of KV cache + recurrent state for ``batch`` sequences of ``context`` tokens on one rank."""
    if context < 1 or batch < 1:
        raise BadInput("context and batch must be at least 1")
    if engine == "llama.cpp" and CACHE_TYPES[cache_v][0] > 1 and not flash_attn:
        raise BadInput(f"llama.cpp keeps a quantized V cache ({cache_v}) only with flash attention enabled")
    window = a.sliding_window or context
    if engine == "llama.cpp":
        cells = pad(context, LLAMA_CPP_PAD)  # n_ctx_seq, one stream per sequence (kv_unified = false)
        swa_cells = cells if swa_full else pad(min(cells, window + n_ubatch), LLAMA_CPP_PAD)
        rule = f"cells = pad256({context}) = {cells}"
        if SWA in a.layer_kinds and swa_full:
            rule += f"; SWA cells = {cells} (swa_full, the llama.cpp library default)"
        elif SWA in a.layer_kinds:
            rule += f"; SWA cells = pad256(min({cells}, {window} + n_ubatch {n_ubatch})) = {swa_cells}"
    elif engine == "vllm":
        cells = pad(context, VLLM_BLOCK)
        swa_cells = min(cells, (pad(window, VLLM_BLOCK) // VLLM_BLOCK + 1) * VLLM_BLOCK)
        rule = f"cells = 16·⌈{context}/16⌉ = {cells}"
        if SWA in a.layer_kinds:
            rule += f"; SWA cells = 16·(⌈{window}/16⌉+1) = {swa_cells}"
    else:
        cells, swa_cells = context, min(context, window)
        rule = f"cells = {context}" + (
            f"; SWA cells = min({context}, {window})" if SWA in a.layer_kinds else ""
        )
    k_total = v_total = 0
    per_token = 0
    rank_heads: list[int] = []
    for i, kind in enumerate(a.layer_kinds):
        if kind == RECURRENT:
            continue
        k_el, v_el = a.kv_elements_per_token(i)
        if engine == "vllm" and not a.is_mla and tp > 1:
            heads = max(1, a.n_kv_heads[i] // tp)  # replicated when tp > kv heads
            k_el, v_el = heads * a.head_dim_k, heads * a.head_dim_v
            rank_heads.append(heads)
        kr, vr = row_bytes(cache_k, k_el), (row_bytes(cache_v, v_el) if v_el else 0)
        n = swa_cells if kind == SWA else cells
        k_total += kr * n * batch
        v_total += vr * n * batch
        if kind != SWA:
            per_token += kr + vr
    state = 0
    n_rec = a.layer_kinds.count(RECURRENT)
    if n_rec:
        st = state_type or ("f32" if engine == "llama.cpp" else _MODEL_DTYPE_CACHE.get(a.dtype, "f32"))
        state = n_rec * batch * (a.conv_state + a.ssm_state) * CACHE_TYPES[st][1]
    if a.is_mla:
        rule += f"; MLA row = kv_lora_rank {a.kv_lora_rank} + qk_rope_head_dim {a.qk_rope_head_dim}, no V"
        if engine == "vllm" and tp > 1:
            rule += " (replicated on every TP rank)"
    elif rank_heads and min(rank_heads) * tp > min(
        a.n_kv_heads[i] for i in range(a.n_layers) if a.n_kv_heads[i]
    ):
        rule += f"; KV heads replicated: {max(rank_heads)} per rank at tp={tp}"
    formula = f"Σ_layers cells × batch {batch} × (K row [{cache_k}] + V row [{cache_v}]); {rule}"
    return KVLayout(k_total, v_total, state, per_token, cells, swa_cells, formula, cache_k, cache_v)
