"""Hugging Face ⇄ GGUF tensor names and the per-architecture facts the converters need.

An architecture is data: its GGUF name, the HF classes it covers, whether llama.cpp expects the q/k rows
permuted, and the tensor-name table. Adding an architecture with the llama block layout is one entry here.
tests/test_convert.py checks these names against gguf-py's TensorNameMap.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llmq.errors import UnsupportedArchitecture

# HF name (with {bid} for the block index) -> GGUF name. Shared by every llama-layout architecture.
LLAMA_LAYOUT: dict[str, str] = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{bid}.input_layernorm.weight": "blk.{bid}.attn_norm.weight",
    "model.layers.{bid}.self_attn.q_proj.weight": "blk.{bid}.attn_q.weight",
    "model.layers.{bid}.self_attn.q_proj.bias": "blk.{bid}.attn_q.bias",
    "model.layers.{bid}.self_attn.k_proj.weight": "blk.{bid}.attn_k.weight",
    "model.layers.{bid}.self_attn.k_proj.bias": "blk.{bid}.attn_k.bias",
    "model.layers.{bid}.self_attn.v_proj.weight": "blk.{bid}.attn_v.weight",
    "model.layers.{bid}.self_attn.v_proj.bias": "blk.{bid}.attn_v.bias",
    "model.layers.{bid}.self_attn.o_proj.weight": "blk.{bid}.attn_output.weight",
    "model.layers.{bid}.self_attn.o_proj.bias": "blk.{bid}.attn_output.bias",
    "model.layers.{bid}.self_attn.q_norm.weight": "blk.{bid}.attn_q_norm.weight",
    "model.layers.{bid}.self_attn.k_norm.weight": "blk.{bid}.attn_k_norm.weight",
    "model.layers.{bid}.post_attention_layernorm.weight": "blk.{bid}.ffn_norm.weight",
    "model.layers.{bid}.mlp.gate_proj.weight": "blk.{bid}.ffn_gate.weight",
    "model.layers.{bid}.mlp.up_proj.weight": "blk.{bid}.ffn_up.weight",
    "model.layers.{bid}.mlp.down_proj.weight": "blk.{bid}.ffn_down.weight",
    "model.layers.{bid}.mlp.gate_proj.bias": "blk.{bid}.ffn_gate.bias",
    "model.layers.{bid}.mlp.up_proj.bias": "blk.{bid}.ffn_up.bias",
    "model.layers.{bid}.mlp.down_proj.bias": "blk.{bid}.ffn_down.bias",
}

# Gemma 2/3 put a norm after attention and around the MLP
GEMMA2_LAYOUT: dict[str, str] = {
    **{k: v for k, v in LLAMA_LAYOUT.items() if "post_attention_layernorm" not in k},
    "model.layers.{bid}.post_attention_layernorm.weight": "blk.{bid}.post_attention_norm.weight",
    "model.layers.{bid}.pre_feedforward_layernorm.weight": "blk.{bid}.ffn_norm.weight",
    "model.layers.{bid}.post_feedforward_layernorm.weight": "blk.{bid}.post_ffw_norm.weight",
}

# HF tensors that carry no weights llama.cpp uses
SKIPPED_HF = re.compile(r"(\.rotary_emb\.inv_freq|\.attention\.masked_bias|\.attention\.bias)$")


@dataclass(frozen=True)
class Arch:
    gguf_arch: str  # general.architecture
    hf_classes: tuple[str, ...]  # config.json "architectures" this entry converts from
    hf_class: str  # what GGUF -> HF writes
    model_type: str
    permute_qk: bool  # llama.cpp's llama arch wants q/k rows interleaved per head (LlamaModel.permute)
    attention_bias: bool | None = None  # written into config.json when not None
    extra_config: Mapping[str, Any] = field(default_factory=dict)
    layout: Mapping[str, str] = field(default_factory=lambda: LLAMA_LAYOUT)
    # Gemma's RMSNorm multiplies by (1 + w); llama.cpp stores 1 + w (convert_hf_to_gguf.py adds it)
    norm_shift: float = 0.0
    # Gemma ties lm_head to the embeddings; llama.cpp never reads an lm_head for it
    tied_output: bool = False


ARCHES: dict[str, Arch] = {
    "llama": Arch("llama", ("LlamaForCausalLM", "MistralForCausalLM", "LlamaModel"), "LlamaForCausalLM",
                  "llama", True, attention_bias=False, extra_config={"mlp_bias": False}),
    "qwen2": Arch("qwen2", ("Qwen2ForCausalLM",), "Qwen2ForCausalLM", "qwen2", False,
                  extra_config={"use_sliding_window": False}),
    "qwen3": Arch("qwen3", ("Qwen3ForCausalLM",), "Qwen3ForCausalLM", "qwen3", False, attention_bias=False),
    "gemma": Arch("gemma", ("GemmaForCausalLM",), "GemmaForCausalLM", "gemma", False, attention_bias=False,
                  extra_config={"hidden_activation": "gelu_pytorch_tanh", "hidden_act": "gelu_pytorch_tanh"},
                  norm_shift=1.0, tied_output=True),
    "gemma2": Arch("gemma2", ("Gemma2ForCausalLM",), "Gemma2ForCausalLM", "gemma2", False, attention_bias=False,
                   extra_config={"hidden_activation": "gelu_pytorch_tanh", "hidden_act": "gelu_pytorch_tanh"},
                   layout=GEMMA2_LAYOUT, norm_shift=1.0, tied_output=True),
}  # fmt: skip


def arch_for_hf(config: Mapping[str, Any]) -> Arch:
    classes = config.get("architectures") or []
    for cls in classes:
        for arch in ARCHES.values():
            if cls in arch.hf_classes:
                return arch
    mt = config.get("model_type")
    for arch in ARCHES.values():
        if mt == arch.model_type or (mt == "mistral" and arch.gguf_arch == "llama"):
            return arch
    supported = sorted({c for a in ARCHES.values() for c in a.hf_classes})
    raise UnsupportedArchitecture(
        f"architecture {classes or mt!r} is not supported yet (supported: {', '.join(supported)})"
    )


def arch_for_gguf(name: str) -> Arch:
    try:
        return ARCHES[name]
    except KeyError:
        raise UnsupportedArchitecture(
            f"GGUF architecture {name!r} is not supported yet (supported: {', '.join(sorted(ARCHES))})"
        ) from None


def _compile(layout: Mapping[str, str]) -> list[tuple[re.Pattern[str], str]]:
    out = []
    for src, dst in layout.items():
        pat = re.escape(src).replace(r"\{bid\}", r"(?P<bid>\d+)")
        out.append((re.compile(f"^{pat}$"), dst))
    return out


def hf_to_gguf_name(arch: Arch, name: str) -> str | None:
    """GGUF name of an HF tensor, None for tensors llama.cpp does not use; raises for unknown tensors."""
    if SKIPPED_HF.search(name) or (arch.tied_output and name == "lm_head.weight"):
        return None
    for pat, dst in _compile(arch.layout):
        m = pat.match(name)
        if m:
            return dst.format(bid=m.groupdict().get("bid", ""))
    raise UnsupportedArchitecture(f"tensor {name} has no GGUF name for architecture {arch.gguf_arch}")


def gguf_to_hf_name(arch: Arch, name: str) -> str | None:
    """HF name of a GGUF tensor; None for GGUF-only tensors (rope_freqs) that HF derives from the config."""
    if name == "rope_freqs.weight":
        return None
    inverse = {v: k for k, v in arch.layout.items()}
    for pat, dst in _compile(inverse):
        m = pat.match(name)
        if m:
            return dst.format(bid=m.groupdict().get("bid", ""))
    raise UnsupportedArchitecture(
        f"GGUF tensor {name} has no Hugging Face name for architecture {arch.gguf_arch}"
    )


def shifted_norm(arch: Arch, gguf_name: str) -> bool:
    """Whether this tensor is stored as (1 + w) in GGUF for the architecture."""
    return bool(arch.norm_shift) and gguf_name.endswith("norm.weight")


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF → llama.cpp row order of a q/k projection: per head, rotary halves become interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of :func:`permute_qk`."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def qk_heads(hf_name: str, n_head: int, n_head_kv: int) -> int | None:
    """How many heads to permute over for this HF tensor, or None when it is not a q/k projection."""
    if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        return n_head
    if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        return n_head_kv
    return None
