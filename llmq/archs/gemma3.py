"""Gemma 3 (text): Gemma 2's layout plus per-head q/k norms, 5 local : 1 global layers with their own rope bases,
no attention soft-capping. Covers ``gemma3_text`` checkpoints and the language model of ``gemma3`` (multimodal)
ones, whose vision tower llama.cpp keeps in a separate mmproj file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llmq.archs.base import KV, LLAMA_BLOCK, Family, f32_short, llama_scale_groups
from llmq.archs.gemma import GELU_TANH
from llmq.archs.gemma2 import GEMMA2_TENSORS
from llmq.archs.rope import local_rope_theta
from llmq.io.ggml_types import GGUFValueType

U32, F32 = GGUFValueType.UINT32, GGUFValueType.FLOAT32

# where multimodal checkpoints keep the language model (transformers >= 4.52, then older) and what to drop
_TEXT_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                  ("language_model.lm_head.", "lm_head."))  # fmt: skip
_OTHER_PREFIXES = (
    "vision_tower.",
    "multi_modal_projector.",
    "model.vision_tower.",
    "model.multi_modal_projector.",
)

# Gemma3TextConfig's defaults, which multimodal checkpoints' text_config leaves out (google/gemma-3-4b-it lists
# only what differs); convert_hf_to_gguf.py falls back to the same values.
TEXT_DEFAULTS = {
    "vocab_size": 262208, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
    "rms_norm_eps": 1e-6, "max_position_embeddings": 131072, "query_pre_attn_scalar": 256, "sliding_window": 4096,
    "rope_theta": 1_000_000.0, "rope_local_base_freq": 10000.0,
}  # fmt: skip


@dataclass(frozen=True)
class Gemma3(Family):
    def source_config(self, config: Mapping[str, Any]) -> Mapping[str, Any]:
        text = config.get("text_config")
        if not isinstance(text, Mapping):
            return config
        defaults = dict(TEXT_DEFAULTS)
        if isinstance(text.get("rope_parameters"), Mapping):  # transformers 5 spells both rope bases there
            del defaults["rope_theta"], defaults["rope_local_base_freq"]
        out = {**defaults, **text, "architectures": [self.hf_class], "model_type": "gemma3_text"}
        for key in ("tie_word_embeddings", "_name_or_path"):
            if config.get(key) is not None:
                out[key] = config[key]
        return out

    def source_name(self, name: str) -> str | None:
        if name.startswith(_OTHER_PREFIXES):
            return None
        for old, new in _TEXT_PREFIXES:
            if name.startswith(old):
                return new + name[len(old) :]
        return name

    def gguf_kv(self, config: Mapping[str, Any]) -> KV:
        a = self.name
        kv: KV = []
        if config.get("final_logit_softcapping"):
            kv.append((f"{a}.final_logit_softcapping", float(config["final_logit_softcapping"]), F32))
        if config.get("sliding_window_pattern") != 1 and config.get("sliding_window"):
            kv.append((f"{a}.attention.sliding_window", int(config["sliding_window"]), U32))
        local = local_rope_theta(config)
        if local is not None:
            kv.append((f"{a}.rope.freq_base_swa", local, F32))
        return kv

    def hf_config(self, meta: Mapping[str, Any], head_dim: int) -> dict[str, Any]:
        a = self.name
        cfg: dict[str, Any] = {
            "final_logit_softcapping": None,
            "attn_logit_softcapping": None,
            "rope_local_base_freq": f32_short(meta.get(f"{a}.rope.freq_base_swa", 10000.0)),
            # llama.cpp scales queries by 1/sqrt(head_dim) (27B aside, whose config llmq.hf_config keeps)
            "query_pre_attn_scalar": int(head_dim),
        }
        if meta.get(f"{a}.final_logit_softcapping") is not None:
            cfg["final_logit_softcapping"] = f32_short(meta[f"{a}.final_logit_softcapping"])
        window = meta.get(f"{a}.attention.sliding_window")
        if window:
            cfg["sliding_window"] = int(window)
            cfg["sliding_window_pattern"] = (
                6  # llama.cpp's default for gemma3; transformers derives layer_types
            )
        else:
            cfg["sliding_window"] = None
            cfg["sliding_window_pattern"] = 1
        return cfg


FAMILY = Gemma3(
    "gemma3",
    model_types=("gemma3_text", "gemma3"),
    hf_classes=("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"),
    hf_class="Gemma3ForCausalLM",
    tensors=GEMMA2_TENSORS,
    attention_bias=False,
    extra_config=GELU_TANH,
    norm_shift=1.0,
    tied_output=True,
    tokenizer="gemma3",
    scale_groups=llama_scale_groups("pre_feedforward_layernorm"),
    swa_period=6,
    block_tensors=(
        *LLAMA_BLOCK,
        "post_attention_norm.weight",
        "post_ffw_norm.weight",
        "attn_q_norm.weight",
        "attn_k_norm.weight",
    ),  # fmt: skip
)
