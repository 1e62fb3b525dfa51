"""Plan-time validation of a model's config (config.json or GGUF metadata) and tensors against its family.

Every command that reads a model checks it here before writing anything: types, ranges and divisibility of the
dimensions, then that every tensor the family needs is present with the shape the config implies and that no
tensor is left over unexplained. Any violation is one :class:`~llmq.errors.BadConfig` line naming the file and
the key or tensor.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llmq.archs.base import Family
from llmq.archs.rope import rope_parameters
from llmq.errors import BadConfig

_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)\.(weight|bias)$")


@dataclass(frozen=True)
class Dims:
    """The dimensions a family's tensor shapes follow from."""

    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int | None  # None when only the tensors say (GGUF without a vocabulary)


def _int(src: str, key: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadConfig(f"{src}: {key} must be an integer, not {_show(value)}")
    if value < minimum:
        raise BadConfig(f"{src}: {key} = {value} is out of range (at least {minimum})")
    return value


def _number(src: str, key: str, value: Any, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadConfig(f"{src}: {key} must be a number, not {_show(value)}")
    if positive and not value > 0:
        raise BadConfig(f"{src}: {key} = {value} must be positive")
    return float(value)


def _show(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def required_int(src: str, cfg: Mapping[str, Any], key: str, minimum: int = 1) -> int:
    if cfg.get(key) is None:
        raise BadConfig(f"{src}: {key} is missing")
    return _int(src, key, cfg[key], minimum)


def optional_int(src: str, cfg: Mapping[str, Any], key: str, minimum: int = 1) -> int | None:
    v = cfg.get(key)
    return None if v is None else _int(src, key, v, minimum)


def check_hf_config(config: Any, family: Family, src: str) -> Dims:
    """Types, ranges and divisibility of an HF config.json dict; returns the dimensions it implies."""
    if not isinstance(config, Mapping):
        raise BadConfig(f"{src}: must be a JSON object, not {_show(config)}")
    hidden = required_int(src, config, "hidden_size")
    ffn = required_int(src, config, "intermediate_size")
    layers = required_int(src, config, "num_hidden_layers")
    heads = required_int(src, config, "num_attention_heads")
    kv_heads = optional_int(src, config, "num_key_value_heads") or heads
    if heads % kv_heads:
        raise BadConfig(
            f"{src}: num_attention_heads = {heads} is not a multiple of num_key_value_heads = {kv_heads}"
        )
    head_dim = optional_int(src, config, "head_dim")
    if head_dim is None:
        if hidden % heads:
            raise BadConfig(
                f"{src}: hidden_size = {hidden} is not a multiple of num_attention_heads = {heads}"
            )
        head_dim = hidden // heads
    vocab = required_int(src, config, "vocab_size")
    optional_int(src, config, "max_position_embeddings")
    optional_int(src, config, "sliding_window")
    for key in ("rms_norm_eps", "rope_theta"):
        if config.get(key) is not None:
            _number(src, key, config[key])
    for key in ("rope_scaling", "rope_parameters"):
        v = config.get(key)
        if v is not None and not isinstance(v, Mapping):
            raise BadConfig(f"{src}: {key} must be an object, not {_show(v)}")
    rope = rope_parameters(config)
    for key in ("factor", "rope_theta"):
        if rope.get(key) is not None:
            _number(src, f"rope {key}", rope[key])
    if rope.get("original_max_position_embeddings") is not None:
        _int(src, "rope original_max_position_embeddings", rope["original_max_position_embeddings"])
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = config.get(key)
        for item in v if isinstance(v, list) else [v]:
            if item is not None:
                _int(src, key, item, minimum=0)
    tie = config.get("tie_word_embeddings")
    if tie is not None and not isinstance(tie, bool):
        raise BadConfig(f"{src}: tie_word_embeddings must be true or false, not {_show(tie)}")
    return Dims(hidden, ffn, layers, heads, kv_heads, head_dim, vocab)


def gguf_int(src: str, meta: Mapping[str, Any], key: str, default: Any = None, minimum: int = 1) -> int:
    """An integer GGUF KV (a per-layer array must be uniform), range-checked; missing → default or error."""
    v = meta.get(key, default)
    if v is None:
        raise BadConfig(f"{src}: {key} is missing")
    if isinstance(v, list):
        if not v:
            raise BadConfig(f"{src}: {key} is an empty array")
        for item in v:
            _int(src, key, item, minimum)
        if len(set(v)) != 1:
            raise BadConfig(f"{src}: {key} varies per layer; not supported by the converter yet")
        v = v[0]
    return _int(src, key, v, minimum)


def gguf_number(src: str, meta: Mapping[str, Any], key: str, default: float) -> float:
    v = meta.get(key, default)
    return _number(src, key, v)


def check_tensors(family: Family, dims: Dims, shapes: Mapping[str, tuple[int, ...]], src: str,
                  tied: bool | None = None, hf: bool = False) -> None:  # fmt: skip
    """Every tensor the family needs is present with the shape ``dims`` implies; none is left over.

    ``shapes`` maps GGUF names (HF tensors already renamed by the family) to shapes in (out, in) order.
    ``tied`` False requires an output projection; ``hf`` names tensors by their HF names in errors.
    """

    def show(name: str) -> str:
        return (family.gguf_to_hf_name(name) or name) if hf else name

    expect = family.tensor_shapes(dims)
    for name, shape in shapes.items():
        if any(d <= 0 for d in shape):
            raise BadConfig(f"{src}: tensor {show(name)} has a zero dimension {list(shape)}")
        m = _BLOCK.match(name)
        if m and int(m.group(1)) >= dims.layers:
            raise BadConfig(f"{src}: tensor {show(name)} is left over: the config has {dims.layers} layers")
        want = expect.get(f"{m.group(2)}.{m.group(3)}" if m else name)
        if want is not None and tuple(want) != tuple(shape):
            raise BadConfig(
                f"{src}: tensor {show(name)} has shape {list(shape)}; the config implies {list(want)}"
            )
    needed = [n for n in family.global_tensors if not (n == "output.weight" and tied is not False)]
    needed += [f"blk.{i}.{t}" for i in range(dims.layers) for t in family.block_tensors]
    for name in needed:
        if name not in shapes:
            raise BadConfig(f"{src}: tensor {show(name)} is missing (the config has {dims.layers} layers)")


def check_hf_model(family: Family, config: Any, shapes: Mapping[str, tuple[int, ...]], src: str) -> Dims:
    """An HF checkpoint's config.json and tensors (HF names -> shapes) against its family; returns the dims."""
    config = family.source_config(config)
    dims = check_hf_config(config, family, f"{src}/config.json")
    named = {}
    for name, shape in shapes.items():
        gname = family.hf_to_gguf_name(name)
        if gname is not None:
            named[gname] = tuple(shape)
    tied = True if family.tied_output else (False if config.get("tie_word_embeddings") is False else None)
    check_tensors(family, dims, named, src, tied=tied, hf=True)
    return dims


def check_gguf_kv(family: Family, meta: Mapping[str, Any], src: str) -> None:
    """Types and ranges of the hyperparameter KVs llama.cpp reads for a registered family."""
    a = family.gguf_arch
    for key in ("block_count", "embedding_length", "feed_forward_length", "attention.head_count"):
        gguf_int(src, meta, f"{a}.{key}")
    heads = gguf_int(src, meta, f"{a}.attention.head_count")
    kv_heads = gguf_int(src, meta, f"{a}.attention.head_count_kv", heads)
    if heads % kv_heads:
        raise BadConfig(
            f"{src}: {a}.attention.head_count = {heads} is not a multiple of head_count_kv = {kv_heads}"
        )
    for key in ("context_length", "attention.key_length", "attention.value_length", "rope.dimension_count"):
        if meta.get(f"{a}.{key}") is not None:
            gguf_int(src, meta, f"{a}.{key}")
    for key in ("bos_token_id", "eos_token_id", "padding_token_id"):
        if meta.get(f"tokenizer.ggml.{key}") is not None:
            gguf_int(src, meta, f"tokenizer.ggml.{key}", minimum=0)
