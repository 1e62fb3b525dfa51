"""Granite (3.x dense): llama's layout and q/k permutation, plus four multipliers llama.cpp reads as scales."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llmq.archs.base import KV, f32_short
from llmq.archs.llama import Llama
from llmq.io.ggml_types import GGUFValueType

F32 = GGUFValueType.FLOAT32

# config.json multiplier -> GGUF key suffix (convert_hf_to_gguf.py renames *_multiplier to *_scale)
MULTIPLIERS = {
    "attention_multiplier": "attention.scale",
    "embedding_multiplier": "embedding_scale",
    "residual_multiplier": "residual_scale",
    "logits_scaling": "logit_scale",
}


@dataclass(frozen=True)
class Granite(Llama):
    def gguf_kv(self, config: Mapping[str, Any]) -> KV:
        return [
            (f"{self.name}.{key}", float(config[hf]), F32)
            for hf, key in MULTIPLIERS.items()
            if config.get(hf)
        ]

    def hf_config(self, meta: Mapping[str, Any], head_dim: int) -> dict[str, Any]:
        return {hf: f32_short(meta.get(f"{self.name}.{key}", 1.0)) for hf, key in MULTIPLIERS.items()}


FAMILY = Granite(
    "granite",
    model_types=("granite",),
    hf_classes=("GraniteForCausalLM",),
    hf_class="GraniteForCausalLM",
    permute_qk=True,
    attention_bias=False,
    extra_config={"mlp_bias": False},
    tokenizer="llama",
    writes_vocab_size=True,
)
