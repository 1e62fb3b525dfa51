"""Rope settings of a Hugging Face config and their GGUF keys, both ways: one home for every scaling variant.

transformers 4.x writes ``rope_theta`` + ``rope_scaling``; 5.x writes ``rope_parameters`` (per layer type for
families with local and global attention). llama.cpp reads ``{arch}.rope.freq_base`` and, for scaled ropes,
``{arch}.rope.scaling.*``; llama3's per-frequency factors travel as the ``rope_freqs.weight`` tensor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from llmq.errors import UnsupportedType
from llmq.io.ggml_types import GGUFValueType

U32, F32 = GGUFValueType.UINT32, GGUFValueType.FLOAT32
ROPE_FREQS = "rope_freqs.weight"  # llama3 factors: GGUF-only, HF derives them from the config


def rope_parameters(config: Mapping[str, Any], layer_type: str = "full_attention") -> dict[str, Any]:
    """Rope settings from a transformers 4.x (rope_theta + rope_scaling) or 5.x (rope_parameters) config."""
    params = dict(config.get("rope_parameters") or {})
    if layer_type in params and isinstance(params[layer_type], dict):
        params = dict(params[layer_type])
    elif "full_attention" in params and isinstance(params["full_attention"], dict):
        params = dict(params["full_attention"])
    legacy = config.get("rope_scaling") or {}
    for k, v in legacy.items():
        params.setdefault(k, v)
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params["type"]
    if "rope_theta" not in params and config.get("rope_theta") is not None:
        params["rope_theta"] = config["rope_theta"]
    return params


def local_rope_theta(config: Mapping[str, Any]) -> float | None:
    """The base frequency of sliding-window layers (Gemma 3), when the config gives one of its own."""
    params = config.get("rope_parameters")
    if isinstance(params, Mapping) and isinstance(params.get("sliding_attention"), Mapping):
        theta = params["sliding_attention"].get("rope_theta")
        if theta is not None:
            return float(theta)
    theta = config.get("rope_local_base_freq")
    return None if theta is None else float(theta)


def rope_type(config: Mapping[str, Any]) -> str:
    return str(rope_parameters(config).get("rope_type") or "default").lower()


def gguf_rope_kv(a: str, config: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """The rope scaling and base-frequency KVs, as convert_hf_to_gguf.py writes them."""
    rope = rope_parameters(config)
    rtype = str(rope.get("rope_type") or "default").lower()
    kv: list[tuple[str, Any, Any]] = []
    if rtype == "linear" and rope.get("factor") is not None:
        kv += [
            (f"{a}.rope.scaling.type", "linear", None),
            (f"{a}.rope.scaling.factor", float(rope["factor"]), F32),
        ]
    elif rtype == "yarn" and rope.get("factor") is not None:
        kv += [
            (f"{a}.rope.scaling.type", "yarn", None),
            (f"{a}.rope.scaling.factor", float(rope["factor"]), F32),
            (f"{a}.rope.scaling.original_context_length", int(rope["original_max_position_embeddings"]), U32),
        ]
    elif rtype not in ("default", "llama3"):
        raise UnsupportedType(f"rope_type {rtype!r} is not supported by the converter yet")
    kv.append((f"{a}.rope.freq_base", float(rope.get("rope_theta", 10000.0)), F32))
    return kv


def hf_rope_scaling(a: str, meta: Mapping[str, Any]) -> dict[str, Any] | None:
    """config.json's rope_scaling from GGUF KVs (None when unscaled)."""
    scaling = meta.get(f"{a}.rope.scaling.type")
    if scaling == "linear":
        return {"rope_type": "linear", "factor": float(meta[f"{a}.rope.scaling.factor"])}
    if scaling == "yarn":
        return {
            "rope_type": "yarn",
            "factor": float(meta[f"{a}.rope.scaling.factor"]),
            "original_max_position_embeddings": int(meta[f"{a}.rope.scaling.original_context_length"]),
        }
    if scaling not in (None, "none"):
        raise UnsupportedType(f"rope scaling {scaling!r} is not supported by the converter yet")
    return None


def llama3_rope_factors(params: Mapping[str, Any], dim: int) -> np.ndarray:
    """The per-frequency factors llama.cpp reads from rope_freqs.weight for rope_type "llama3"."""
    base = float(params.get("rope_theta", 10000.0))
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    factor = params.get("factor", 8.0)
    low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    old_ctx = params.get("original_max_position_embeddings", 8192)
    low_wl, high_wl = old_ctx / low, old_ctx / high
    out = []
    for f in freqs.tolist():
        wl = 2 * math.pi / f
        if wl < high_wl:
            out.append(1.0)
        elif wl > low_wl:
            out.append(factor)
        else:
            smooth = (old_ctx / wl - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)
