"""Llama (1/2/3) and Mistral: the reference llama layout, q/k rows permuted for llama.cpp's rope; llama3 rope
scaling travels as per-frequency factors in ``rope_freqs.weight``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from llmq.archs.base import Family, head_dim
from llmq.archs.rope import ROPE_FREQS, llama3_rope_factors, rope_parameters


@dataclass(frozen=True)
class Llama(Family):
    def extra_tensors(self, config: Mapping[str, Any]) -> list[tuple[str, np.ndarray]]:
        rope = rope_parameters(config)
        if str(rope.get("rope_type", "")).lower() != "llama3":
            return []
        return [(ROPE_FREQS, llama3_rope_factors(rope, head_dim(config)))]


FAMILY = Llama(
    "llama",
    model_types=("llama", "mistral"),
    hf_classes=("LlamaForCausalLM", "MistralForCausalLM", "LlamaModel"),
    hf_class="LlamaForCausalLM",
    permute_qk=True,
    attention_bias=False,
    extra_config={"mlp_bias": False},
    tokenizer="llama",
    writes_vocab_size=True,
)
