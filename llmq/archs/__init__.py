"""The architecture registry: one module per family, looked up by HF config or GGUF architecture.

Adding a family is one new module that defines ``FAMILY`` (a :class:`~llmq.archs.base.Family`) plus its name in
``_MODULES``. Every command (convert, quantize, estimate, GPTQ/AWQ, imatrix) asks this registry.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from llmq.archs.base import Family, ScaleGroup, permute_qk, unpermute_qk
from llmq.errors import UnsupportedArchitecture

__all__ = [
    "FAMILIES", "Family", "ScaleGroup", "for_gguf", "for_hf", "for_model_type", "lookup", "permute_qk",
    "unpermute_qk",
]  # fmt: skip

_MODULES = ("llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "olmo2", "granite")

FAMILIES: dict[str, Family] = {
    f.name: f for f in (importlib.import_module(f"llmq.archs.{m}").FAMILY for m in _MODULES)
}


def lookup(config: Mapping[str, Any]) -> Family | None:
    """The family of an HF config.json dict (its ``architectures`` first, then ``model_type``), or None."""
    classes = config.get("architectures")
    if isinstance(classes, list):
        for cls in classes:
            for fam in FAMILIES.values():
                if cls in fam.hf_classes:
                    return fam
    mt = config.get("model_type")
    for fam in FAMILIES.values():
        if mt in fam.model_types:
            return fam
    return None


def for_hf(config: Mapping[str, Any]) -> Family:
    fam = lookup(config)
    if fam is None:
        classes = config.get("architectures") or []
        supported = sorted({c for f in FAMILIES.values() for c in f.hf_classes})
        raise UnsupportedArchitecture(
            f"architecture {classes or config.get('model_type')!r} is not supported yet "
            f"(supported: {', '.join(supported)})"
        )
    return fam


def for_model_type(config: Mapping[str, Any], purpose: str = "block-wise quantization") -> Family:
    """The family of an HF config by ``model_type`` alone (what the block-wise quantizers key on)."""
    model_type = str(config.get("model_type", ""))
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    known = ", ".join(t for f in FAMILIES.values() for t in f.model_types)
    raise UnsupportedArchitecture(
        f"model_type {model_type or '(missing)'!r} is not supported by {purpose} (supported: {known})"
    )


def for_gguf(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise UnsupportedArchitecture(
            f"GGUF architecture {name!r} is not supported yet (supported: {', '.join(sorted(FAMILIES))})"
        ) from None
