"""The common tensor IO layer: one reader interface over safetensors files, HF directories and GGUF (split or not),
streaming writers for both formats. Nothing here imports torch until a tensor is read as a torch tensor."""

from __future__ import annotations

import os
from pathlib import Path

from llmq.errors import BadInput, CorruptFile
from llmq.io.base import AtomicOutput, CheckpointReader, TensorInfo, check_output
from llmq.io.gguf import GGUFFileWriter, GGUFReader
from llmq.io.safetensors import PICKLE_SUFFIXES, SafetensorsReader, SafetensorsWriter

__all__ = [
    "AtomicOutput", "CheckpointReader", "GGUFFileWriter", "GGUFReader", "SafetensorsReader", "SafetensorsWriter",
    "TensorInfo", "check_output", "open_checkpoint", "detect_kind",
]  # fmt: skip


def detect_kind(path: str | os.PathLike) -> str:
    """ "gguf" or "safetensors" from the path and, for files, the magic bytes."""
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


def open_checkpoint(path: str | os.PathLike, allow_pickle: bool = False) -> GGUFReader | SafetensorsReader:
    """A reader for a .safetensors file, a Hugging Face model directory, or a (split) GGUF file."""
    if detect_kind(path) == "gguf":
        return GGUFReader(path)
    return SafetensorsReader(path, allow_pickle=allow_pickle)
