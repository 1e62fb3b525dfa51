"""Declarative descriptions of decoder-only architectures, as data.

The block-by-block quantizers (GPTQ, AWQ) need to know, for one decoder block: which Linear layers it holds,
in which order they see data (true-sequential groups), and for AWQ which op precedes each group of Linears
sharing an input (so a per-channel scale can be folded into it). Nothing here imports torch.

Adding an architecture is a few lines: a new ``Arch(...)`` in ``ARCHES`` (most reuse ``_LLAMA_BLOCK``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llmq.errors import UnsupportedArchitecture


@dataclass(frozen=True)
class ScaleGroup:
    """Linears that read the same input, and the op whose output that input is (AWQ folds scales into it).

    ``inspect`` is the submodule whose output measures the loss of a scale choice (the attention for q/k/v, the
    MLP for gate/up, the Linear itself otherwise). ``prev_kind`` is "norm" or "linear".
    """

    prev: str
    prev_kind: str
    linears: tuple[str, ...]
    inspect: str


@dataclass(frozen=True)
class Arch:
    name: str
    model_types: tuple[str, ...]
    layers: str = "model.layers"  # prefix of the decoder blocks in checkpoint tensor names
    # Linears of one block in the order data reaches them; each inner tuple shares one input
    sequential: tuple[tuple[str, ...], ...] = ()
    scale_groups: tuple[ScaleGroup, ...] = ()
    # gemma's RMSNorm multiplies by (1 + w): folding a scale s into it changes w to (1 + w) / s - 1
    norm_offset: float = 0.0

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.sequential for name in group)

    def block_prefix(self, i: int) -> str:
        return f"{self.layers}.{i}."


_ATTN_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_MLP_IN = ("mlp.gate_proj", "mlp.up_proj")
_LLAMA_SEQUENTIAL = (_ATTN_QKV, ("self_attn.o_proj",), _MLP_IN, ("mlp.down_proj",))


def _llama_scale_groups(post_attn_norm: str = "post_attention_layernorm") -> tuple[ScaleGroup, ...]:
    return (
        ScaleGroup("input_layernorm", "norm", _ATTN_QKV, "self_attn"),
        # v -> o only works when v's output rows map one-to-one to o's input columns (no GQA); checked at run time
        ScaleGroup("self_attn.v_proj", "linear", ("self_attn.o_proj",), "self_attn.o_proj"),
        ScaleGroup(post_attn_norm, "norm", _MLP_IN, "mlp"),
        ScaleGroup("mlp.up_proj", "linear", ("mlp.down_proj",), "mlp.down_proj"),
    )


ARCHES: dict[str, Arch] = {
    a.name: a
    for a in (
        Arch("llama", ("llama",), sequential=_LLAMA_SEQUENTIAL, scale_groups=_llama_scale_groups()),
        Arch("mistral", ("mistral",), sequential=_LLAMA_SEQUENTIAL, scale_groups=_llama_scale_groups()),
        Arch("qwen2", ("qwen2",), sequential=_LLAMA_SEQUENTIAL, scale_groups=_llama_scale_groups()),
        # qwen3 adds q_norm/k_norm inside attention: they sit after q/k, so the groups are llama's
        Arch("qwen3", ("qwen3",), sequential=_LLAMA_SEQUENTIAL, scale_groups=_llama_scale_groups()),
        Arch("gemma", ("gemma",), sequential=_LLAMA_SEQUENTIAL, scale_groups=_llama_scale_groups(),
             norm_offset=1.0),
        # gemma2/3 put a norm after attention and another before the MLP: the one feeding gate/up is the latter
        Arch("gemma2", ("gemma2", "gemma3_text"), sequential=_LLAMA_SEQUENTIAL,
             scale_groups=_llama_scale_groups("pre_feedforward_layernorm"), norm_offset=1.0),
    )
}  # fmt: skip


def arch_for_config(config: Mapping[str, Any]) -> Arch:
    """The Arch of an HF config.json dict, or UnsupportedArchitecture naming what is supported."""
    model_type = str(config.get("model_type", ""))
    for arch in ARCHES.values():
        if model_type in arch.model_types:
            return arch
    known = ", ".join(t for a in ARCHES.values() for t in a.model_types)
    raise UnsupportedArchitecture(
        f"model_type {model_type or '(missing)'!r} is not supported by block-wise quantization (supported: {known})"
    )


def num_layers(config: Mapping[str, Any]) -> int:
    n = config.get("num_hidden_layers")
    if not isinstance(n, int) or n <= 0:
        raise UnsupportedArchitecture("config.json has no positive num_hidden_layers")
    return n
