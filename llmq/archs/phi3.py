"""Phi-3 / 3.5 / Phi-4-mini: fused qkv_proj and gate_up_proj (llama.cpp keeps both fused: attn_qkv, and ffn_up
holding gate then up), neox rope, optional partial rotary dims, and longrope ("su") scaling whose per-frequency
factors travel as rope_factors_long/short tensors."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from llmq.archs.base import KV, Family, ScaleGroup
from llmq.archs.rope import rope_parameters
from llmq.errors import BadConfig, UnsupportedType
from llmq.io.ggml_types import GGUFValueType

U32, F32 = GGUFValueType.UINT32, GGUFValueType.FLOAT32
LONG, SHORT = "rope_factors_long.weight", "rope_factors_short.weight"

PHI3_TENSORS: dict[str, str] = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{bid}.input_layernorm.weight": "blk.{bid}.attn_norm.weight",
    "model.layers.{bid}.self_attn.qkv_proj.weight": "blk.{bid}.attn_qkv.weight",
    "model.layers.{bid}.self_attn.o_proj.weight": "blk.{bid}.attn_output.weight",
    "model.layers.{bid}.post_attention_layernorm.weight": "blk.{bid}.ffn_norm.weight",
    "model.layers.{bid}.mlp.gate_up_proj.weight": "blk.{bid}.ffn_up.weight",
    "model.layers.{bid}.mlp.down_proj.weight": "blk.{bid}.ffn_down.weight",
}


def _rope_dims(config: Mapping[str, Any]) -> int:
    rope = rope_parameters(config)
    pct = float(rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)) or 1.0)
    return int(pct * int(config["hidden_size"])) // int(config["num_attention_heads"])


def _original_ctx(config: Mapping[str, Any]) -> int:
    rope = rope_parameters(config)
    orig = rope.get("original_max_position_embeddings", config.get("original_max_position_embeddings"))
    return int(orig if orig is not None else config["max_position_embeddings"])


def _longrope(config: Mapping[str, Any]) -> dict[str, Any] | None:
    rope = rope_parameters(config)
    kind = str(rope.get("rope_type") or "default").lower()
    if kind in ("default", "none"):
        return None
    if kind not in ("longrope", "su"):
        raise UnsupportedType(f"phi3 rope_type {kind!r} is not supported by the converter yet")
    return rope


@dataclass(frozen=True)
class Phi3(Family):
    def tensor_shapes(self, d: Any) -> dict[str, tuple[int, ...]]:
        shapes = super().tensor_shapes(d)
        q, kv = d.heads * d.head_dim, d.kv_heads * d.head_dim
        shapes["attn_qkv.weight"] = (q + 2 * kv, d.hidden)
        shapes["ffn_up.weight"] = (2 * d.ffn, d.hidden)
        return shapes

    def rope_kv(self, config: Mapping[str, Any]) -> KV:
        a = self.name
        theta = float(rope_parameters(config).get("rope_theta", 10000.0))
        kv: KV = [
            (f"{a}.rope.scaling.original_context_length", _original_ctx(config), U32),
            (f"{a}.rope.dimension_count", _rope_dims(config), U32),
            (f"{a}.rope.freq_base", theta, F32),
        ]
        if _longrope(config) is not None:
            scale = int(config["max_position_embeddings"]) / _original_ctx(config)
            orig = _original_ctx(config)
            attn = math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0
            kv.append((f"{a}.rope.scaling.attn_factor", attn, F32))
        return kv

    def gguf_kv(self, config: Mapping[str, Any]) -> KV:
        # 0 tells Phi-4 (no sliding window) from Phi-3, as convert_hf_to_gguf.py writes it
        return [(f"{self.name}.attention.sliding_window", int(config.get("sliding_window") or 0), U32)]

    def extra_tensors(self, config: Mapping[str, Any]) -> list[tuple[str, np.ndarray]]:
        rope = _longrope(config)
        if rope is None:
            return []
        half = _rope_dims(config) // 2
        out = []
        for name, key in ((LONG, "long_factor"), (SHORT, "short_factor")):
            factors = rope.get(key)
            if not isinstance(factors, list) or len(factors) != half:
                raise BadConfig(f"config.json: rope_scaling {key} must be a list of {half} numbers")
            out.append((name, np.asarray(factors, dtype=np.float32)))
        return out

    def hf_config(self, meta: Mapping[str, Any], head_dim: int) -> dict[str, Any]:
        a = self.name
        hidden, heads = int(meta[f"{a}.embedding_length"]), int(meta[f"{a}.attention.head_count"])
        cfg: dict[str, Any] = {"head_dim": hidden // heads}
        dims = meta.get(f"{a}.rope.dimension_count")
        if dims and int(dims) != hidden // heads:
            cfg["partial_rotary_factor"] = int(dims) * heads / hidden
        window = meta.get(f"{a}.attention.sliding_window")
        cfg["sliding_window"] = int(window) if window else None
        orig = meta.get(f"{a}.rope.scaling.original_context_length")
        if orig:
            cfg["original_max_position_embeddings"] = int(orig)
        return cfg


FAMILY = Phi3(
    "phi3",
    model_types=("phi3",),
    hf_classes=("Phi3ForCausalLM",),
    hf_class="Phi3ForCausalLM",
    tensors=PHI3_TENSORS,
    tokenizer="llama",
    gguf_only=(LONG, SHORT),
    swa_in_llama_cpp=False,  # llama.cpp disables Phi SWA (src/models/phi3.cpp): every layer caches the context
    sequential=(("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
    # fused outputs do not map one-to-one onto o_proj / down_proj inputs: only the norms fold scales
    scale_groups=(
        ScaleGroup("input_layernorm", "norm", ("self_attn.qkv_proj",), "self_attn"),
        ScaleGroup("post_attention_layernorm", "norm", ("mlp.gate_up_proj",), "mlp"),
    ),
    block_tensors=tuple(
        f"{t}.weight" for t in ("attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down")
    ),  # fmt: skip
)
