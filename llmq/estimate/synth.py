"""Parameter tensors of a model known only by its config.json (no safetensors headers to read).

The names and shapes follow transformers' llama-family modules (q/k/v/o projections, gated MLP, RMSNorm),
with MoE experts, shared experts, MLA projections and attention biases where the config asks for them, so that
the same per-tensor quantization rules apply as for a real checkpoint. Recurrent (SSM) layers are approximated
by Mamba's projections and flagged as approximate.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llmq.estimate.arch import RECURRENT, ModelArch
from llmq.io.base import ELEMENT_SIZES, TensorInfo


def _t(name: str, shape: tuple[int, ...], dtype: str) -> TensorInfo:
    n = 1
    for d in shape:
        n *= d
    return TensorInfo(name, dtype, shape, n * ELEMENT_SIZES[dtype])


def _mlp(prefix: str, hidden: int, ffn: int, dt: str) -> list[TensorInfo]:
    return [
        _t(f"{prefix}.gate_proj.weight", (ffn, hidden), dt),
        _t(f"{prefix}.up_proj.weight", (ffn, hidden), dt),
        _t(f"{prefix}.down_proj.weight", (hidden, ffn), dt),
    ]


def _attention(p: str, a: ModelArch, cfg: Mapping[str, Any], layer: int, dt: str) -> list[TensorInfo]:
    h = a.hidden
    if a.is_mla:
        nope = int(cfg.get("qk_nope_head_dim", 0))
        v_dim = int(cfg.get("v_head_dim", a.head_dim_v))
        q_rank = int(cfg.get("q_lora_rank") or 0)
        q_out = a.n_heads * (nope + a.qk_rope_head_dim)
        out = []
        if q_rank:
            out += [_t(f"{p}.q_a_proj.weight", (q_rank, h), dt), _t(f"{p}.q_a_layernorm.weight", (q_rank,), dt),
                    _t(f"{p}.q_b_proj.weight", (q_out, q_rank), dt)]  # fmt: skip
        else:
            out.append(_t(f"{p}.q_proj.weight", (q_out, h), dt))
        return out + [
            _t(f"{p}.kv_a_proj_with_mqa.weight", (a.kv_lora_rank + a.qk_rope_head_dim, h), dt),
            _t(f"{p}.kv_a_layernorm.weight", (a.kv_lora_rank,), dt),
            _t(f"{p}.kv_b_proj.weight", (a.n_heads * (nope + v_dim), a.kv_lora_rank), dt),
            _t(f"{p}.o_proj.weight", (h, a.n_heads * v_dim), dt),
        ]
    kvh = a.n_kv_heads[layer]
    q, k, v = a.n_heads * a.head_dim_k, kvh * a.head_dim_k, kvh * a.head_dim_v
    out = [_t(f"{p}.q_proj.weight", (q, h), dt), _t(f"{p}.k_proj.weight", (k, h), dt),
           _t(f"{p}.v_proj.weight", (v, h), dt), _t(f"{p}.o_proj.weight", (h, a.n_heads * a.head_dim_v), dt)]  # fmt: skip
    if cfg.get("attention_bias") or a.arch in ("qwen2", "qwen2_moe"):
        out += [
            _t(f"{p}.q_proj.bias", (q,), dt),
            _t(f"{p}.k_proj.bias", (k,), dt),
            _t(f"{p}.v_proj.bias", (v,), dt),
        ]
    if a.arch.startswith(("qwen3", "gemma3", "olmo2")):  # per-head q/k norms
        out += [_t(f"{p}.q_norm.weight", (a.head_dim_k,), dt), _t(f"{p}.k_norm.weight", (a.head_dim_k,), dt)]
    return out


def _mamba(p: str, a: ModelArch, cfg: Mapping[str, Any], dt: str) -> list[TensorInfo]:
    d_state = int(cfg.get("state_size") or cfg.get("mamba_d_state") or 16)
    d_inner = int(cfg.get("mamba_d_inner") or int(cfg.get("expand", 2)) * a.hidden)
    d_conv = int(cfg.get("conv_kernel") or cfg.get("mamba_d_conv") or 4)
    return [
        _t(f"{p}.in_proj.weight", (2 * d_inner, a.hidden), dt),
        _t(f"{p}.conv1d.weight", (d_inner, 1, d_conv), dt),
        _t(f"{p}.x_proj.weight", (2 * d_state + max(a.hidden // 16, 1), d_inner), dt),
        _t(f"{p}.A_log", (d_inner, d_state), dt),
        _t(f"{p}.D", (d_inner,), dt),
        _t(f"{p}.out_proj.weight", (a.hidden, d_inner), dt),
    ]


def synthesize(a: ModelArch, cfg: Mapping[str, Any]) -> tuple[list[TensorInfo], bool]:
    """(tensors, exact): exact is False when some layers could only be approximated."""
    dt = a.dtype
    exact = True
    out = [_t("model.embed_tokens.weight", (a.vocab, a.hidden), dt)]
    for i in range(a.n_layers):
        p = f"model.layers.{i}"
        out.append(_t(f"{p}.input_layernorm.weight", (a.hidden,), dt))
        out.append(_t(f"{p}.post_attention_layernorm.weight", (a.hidden,), dt))
        if a.layer_kinds[i] == RECURRENT:
            out += _mamba(f"{p}.mamba", a, cfg, dt)
            exact = False
        else:
            out += _attention(f"{p}.self_attn", a, cfg, i, dt)
        if a.is_moe and i >= a.first_dense_layers:
            out.append(_t(f"{p}.mlp.gate.weight", (a.n_experts, a.hidden), dt))
            for e in range(a.n_experts):
                out += _mlp(f"{p}.mlp.experts.{e}", a.hidden, a.moe_ffn, dt)
            if a.n_shared_experts:
                out += _mlp(f"{p}.mlp.shared_experts", a.hidden, a.moe_ffn * a.n_shared_experts, dt)
        else:
            out += _mlp(f"{p}.mlp", a.hidden, a.ffn, dt)
    out.append(_t("model.norm.weight", (a.hidden,), dt))
    if not a.tied_embeddings:
        out.append(_t("lm_head.weight", (a.vocab, a.hidden), dt))
    if a.arch not in ("llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v2",
                      "deepseek_v3", "phi3", "granite", "olmo2"):  # fmt: skip
        exact = False  # other families add norms/biases this generic layout does not know about
    return out, exact
