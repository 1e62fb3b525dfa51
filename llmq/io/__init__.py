"""The common tensor IO layer: one reader interface over safetensors files, HF directories and GGUF (split or not),
streaming writers for both formats. Names resolve lazily, so ``import llmq.io.base`` (or the memory estimator)
does not pay for numpy and the parsers; nothing here imports torch until a tensor is read as a torch tensor."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from llmq.io.base import AtomicOutput, CheckpointReader, TensorInfo, check_output
    from llmq.io.gguf import GGUFFileWriter, GGUFReader
    from llmq.io.safetensors import SafetensorsReader, SafetensorsWriter

_LAZY = {
    "AtomicOutput": "llmq.io.base", "CheckpointReader": "llmq.io.base", "TensorInfo": "llmq.io.base",
    "check_output": "llmq.io.base", "GGUFFileWriter": "llmq.io.gguf", "GGUFReader": "llmq.io.gguf",
    "SafetensorsReader": "llmq.io.safetensors", "SafetensorsWriter": "llmq.io.safetensors",
}  # fmt: skip

__all__ = [
    "AtomicOutput", "CheckpointReader", "GGUFFileWriter", "GGUFReader", "SafetensorsReader", "SafetensorsWriter",
    "TensorInfo", "check_output", "detect_kind", "open_checkpoint",
]  # fmt: skip

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llmq.io' has no attribute {name!r}")


def detect_kind(path: str | os.PathLike) -> str:
    """ "gguf" or "safetensors" from the path and, for files, the magic bytes."""
    from llmq.errors import BadInput, CorruptFile

    p = Path(path)
    if p.is_dir():
        return "safetensors"
    if not p.exists():
        raise BadInput(f"no such file or directory: {p}")
    with open(p, "rb") as f:
        head = f.read(4)
    if head == b"GGUF":
        return "gguf"
    if p.suffix == ".gguf":
        raise CorruptFile(f"{p.name}: not a GGUF file (bad magic)")
    if p.suffix in PICKLE_SUFFIXES or p.suffix == ".safetensors":
        return "safetensors"
    raise BadInput(f"{p.name}: not a .safetensors, .gguf or model directory")


def open_checkpoint(path: str | os.PathLike, allow_pickle: bool = False, header_only: bool = False):
    """A reader for a .safetensors file, a Hugging Face model directory, or a (split) GGUF file.

    ``header_only``: the caller wants shapes, types and scalar metadata; GGUF vocabularies stay undecoded.
    """
    if detect_kind(path) == "gguf":
        from llmq.io.gguf import GGUFReader

        return GGUFReader(path, decode_strings=not header_only)
    p = Path(path)
    if allow_pickle and _is_pickle(p):
        if p.is_dir():
            from llmq.io.paths import check_model_dir

            check_model_dir(p)
        from llmq.io.pickle import PickleReader

        return PickleReader(p)
    from llmq.io.safetensors import SafetensorsReader

    return SafetensorsReader(path)


def _is_pickle(p: Path) -> bool:
    if p.is_dir():
        return not any(p.glob("*.safetensors")) and any(f.suffix in PICKLE_SUFFIXES for f in p.iterdir())
    return p.suffix in PICKLE_SUFFIXES
