"""Gemma 2: Gemma plus norms after attention and around the MLP, logit soft-capping, alternating local layers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llmq.archs.base import KV, LLAMA_BLOCK, LLAMA_TENSORS, Family, f32_short, llama_scale_groups
from llmq.archs.gemma import GELU_TANH
from llmq.io.ggml_types import GGUFValueType

U32, F32 = GGUFValueType.UINT32, GGUFValueType.FLOAT32

GEMMA2_TENSORS: dict[str, str] = {
    **{k: v for k, v in LLAMA_TENSORS.items() if "post_attention_layernorm" not in k},
    "model.layers.{bid}.post_attention_layernorm.weight": "blk.{bid}.post_attention_norm.weight",
    "model.layers.{bid}.pre_feedforward_layernorm.weight": "blk.{bid}.ffn_norm.weight",
    "model.layers.{bid}.post_feedforward_layernorm.weight": "blk.{bid}.post_ffw_norm.weight",
}


@dataclass(frozen=True)
class Gemma2(Family):
    def gguf_kv(self, config: Mapping[str, Any]) -> KV:
        a = self.name
        return [
            (f"{a}.attn_logit_softcapping", float(config.get("attn_logit_softcapping") or 50.0), F32),
            (f"{a}.final_logit_softcapping", float(config.get("final_logit_softcapping") or 30.0), F32),
            (f"{a}.attention.sliding_window", int(config.get("sliding_window") or 4096), U32),
        ]

    def hf_config(self, meta: Mapping[str, Any], head_dim: int) -> dict[str, Any]:
        a = self.name
        return {
            "attn_logit_softcapping": f32_short(meta.get(f"{a}.attn_logit_softcapping", 50.0)),
            "final_logit_softcapping": f32_short(meta.get(f"{a}.final_logit_softcapping", 30.0)),
            "sliding_window": int(meta.get(f"{a}.attention.sliding_window", 4096)),
            # true for Gemma 2 2B/9B; 27B's is kept in llmq.hf_config
            "query_pre_attn_scalar": int(head_dim),
        }


FAMILY = Gemma2(
    "gemma2",
    model_types=("gemma2",),
    hf_classes=("Gemma2ForCausalLM",),
    hf_class="Gemma2ForCausalLM",
    tensors=GEMMA2_TENSORS,
    attention_bias=False,
    extra_config=GELU_TANH,
    norm_shift=1.0,
    tied_output=True,
    tokenizer="gemma2",
    # the norm feeding gate/up is the pre-feedforward one
    scale_groups=llama_scale_groups("pre_feedforward_layernorm"),
    swa_period=2,
    block_tensors=(*LLAMA_BLOCK, "post_attention_norm.weight", "post_ffw_norm.weight"),
)
