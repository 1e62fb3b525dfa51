"""On-disk layouts of quantized weights, apart from the algorithms that produce them.

``get_format(name)`` returns a :class:`llmq.formats.base.Format`: ``gptq`` (AutoGPTQ/GPTQModel v1), ``awq``
(AutoAWQ GEMM), ``compressed-tensors`` (llm-compressor pack-quantized), ``bnb`` (bitsandbytes NF4/FP4).
``write_checkpoint`` (llmq.formats.writer) streams a complete output directory. Third-party formats register
through ``formats.register(name)`` or the ``llmq.formats`` entry-point group.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmq.registry import Registry

if TYPE_CHECKING:
    from llmq.formats.base import Format

formats: Registry[type[Format]] = Registry(
    "checkpoint format",
    entry_point_group="llmq.formats",
    builtin_modules=(
        "llmq.formats.gptq",
        "llmq.formats.awq",
        "llmq.formats.compressed_tensors",
        "llmq.formats.bnb",
    ),
)


def get_format(name: str) -> Format:
    """An instance of the format registered as ``name`` (BadInput naming the known ones otherwise)."""
    return formats.get(name)()


def detect_format(quantization_config: dict | None) -> str | None:
    """The llmq format name of a checkpoint from its config.json ``quantization_config`` (None: not quantized)."""
    if not quantization_config:
        return None
    method = str(quantization_config.get("quant_method", "")).lower()
    if method == "gptq":
        return "gptq"
    if method == "awq":
        return "awq"
    if method == "compressed-tensors":
        return "compressed-tensors"
    if method == "bitsandbytes":
        return "bnb"
    return method or None


__all__ = ["formats", "get_format", "detect_format"]
