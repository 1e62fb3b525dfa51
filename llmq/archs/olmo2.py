"""OLMo 2: post-norm blocks (norms after attention and after the MLP, none before), q/k RMSNorms over the whole
projection rather than per head, neox rope (no permutation)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmq.archs.base import LLAMA_TENSORS, Family, ScaleGroup

OLMO2_TENSORS: dict[str, str] = {
    **{k: v for k, v in LLAMA_TENSORS.items() if "layernorm" not in k},
    "model.layers.{bid}.post_attention_layernorm.weight": "blk.{bid}.post_attention_norm.weight",
    "model.layers.{bid}.post_feedforward_layernorm.weight": "blk.{bid}.post_ffw_norm.weight",
}


@dataclass(frozen=True)
class Olmo2(Family):
    def tensor_shapes(self, d: Any) -> dict[str, tuple[int, ...]]:
        shapes = super().tensor_shapes(d)
        shapes["attn_q_norm.weight"] = (d.heads * d.head_dim,)
        shapes["attn_k_norm.weight"] = (d.kv_heads * d.head_dim,)
        return shapes


FAMILY = Olmo2(
    "olmo2",
    model_types=("olmo2",),
    hf_classes=("Olmo2ForCausalLM",),
    hf_class="Olmo2ForCausalLM",
    tensors=OLMO2_TENSORS,
    attention_bias=False,
    tokenizer="qwen",  # the converter's generic vocabulary: tokenizer.model if present, else GPT-2 BPE
    # the residual stream feeds q/k/v and gate/up un-normalised: only Linear -> Linear scales fold
    scale_groups=(
        ScaleGroup("self_attn.v_proj", "linear", ("self_attn.o_proj",), "self_attn.o_proj"),
        ScaleGroup("mlp.up_proj", "linear", ("mlp.down_proj",), "mlp.down_proj"),
    ),
    block_tensors=tuple(
        f"{t}.weight"
        for t in (
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "attn_q_norm",
            "attn_k_norm",
            "post_attention_norm",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
            "post_ffw_norm",
        )
    ),  # fmt: skip
)
