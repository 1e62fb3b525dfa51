"""Access to llmq.io's reader/writer, with minimal stand-ins while the IO layer is not merged yet.

The stand-ins cover exactly what the formats need: reading an HF safetensors directory (single or sharded) and
writing one planned, streamed safetensors file. Once ``llmq.io`` provides ``open_checkpoint`` and
``SafetensorsWriter`` these are not used.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmq.errors import BadInput, CorruptFile
from llmq.io.base import TensorInfo


def open_source(path):
    """A checkpoint reader for ``path`` (llmq.io's when available)."""
    try:
        from llmq.io import open_checkpoint  # type: ignore[attr-defined]
    except ImportError:
        return _SafetensorsDirReader(Path(path))
    return open_checkpoint(path)


def safetensors_writer(directory: Path, max_shard_bytes: int | None = None, metadata: dict | None = None):
    try:
        from llmq.io import SafetensorsWriter  # type: ignore[attr-defined]
    except ImportError:
        return _SingleFileWriter(Path(directory), metadata)
    return SafetensorsWriter(directory, max_shard_bytes=max_shard_bytes, metadata=metadata)


def reader_config(reader) -> dict[str, Any] | None:
    cfg = getattr(reader, "config", None)
    if cfg is not None:
        return dict(cfg)
    p = Path(reader.path)
    p = p if p.is_dir() else p.parent
    f = p / "config.json"
    return json.loads(f.read_text()) if f.is_file() else None


class _SafetensorsDirReader:
    kind = "safetensors"

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        if path.is_dir():
            index = path / "model.safetensors.index.json"
            if index.is_file():
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            else:
                files = sorted(p.name for p in path.glob("*.safetensors"))
            base = path
        else:
            files, base = [path.name], path.parent
        if not files:
            raise BadInput(f"{path} holds no .safetensors file")
        self._handles = [safe_open(str(base / f), framework="pt") for f in files]
        self._where = {n: h for h in self._handles for n in h.keys()}
        cfg = (base / "config.json") if path.is_dir() else None
        self.config = json.loads(cfg.read_text()) if cfg is not None and cfg.is_file() else None
        self.metadata = self._handles[0].metadata() or {}

    def names(self) -> list[str]:
        return list(self._where)

    def info(self, name: str) -> TensorInfo:
        from llmq.io.base import ELEMENT_SIZES

        sl = self._where[name].get_slice(name)
        code = sl.get_dtype()
        shape = tuple(sl.get_shape())
        n = 1
        for d in shape:
            n *= d
        return TensorInfo(name=name, dtype=code, shape=shape, nbytes=n * ELEMENT_SIZES[code])

    def infos(self):
        for n in self._where:
            yield self.info(n)

    def read(self, name: str, dequantize: bool = True):
        try:
            return self._where[name].get_tensor(name)
        except KeyError:
            raise CorruptFile(f"tensor {name} not found in {self.path}") from None

    def close(self) -> None:
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _SingleFileWriter:
    """Header first from the plan, then tensor bytes streamed in planned order."""

    def __init__(self, directory: Path, metadata: dict | None):
        self.file = directory / "model.safetensors"
        self.metadata = metadata
        self._order: list[TensorInfo] = []
        self._next = 0
        self._f = None

    def plan(self, infos: Sequence[TensorInfo], metadata: Any = None) -> None:
        header: dict[str, Any] = {}
        if self.metadata:
            header["__metadata__"] = {k: str(v) for k, v in self.metadata.items()}
        off = 0
        for i in infos:
            header[i.name] = {"dtype": i.dtype, "shape": list(i.shape), "data_offsets": [off, off + i.nbytes]}
            off += i.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * ((-len(raw)) % 8)
        self._order = list(infos)
        self._f = open(self.file, "wb")
        self._f.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, tensor) -> None:
        from llmq.io.base import dtype_code

        exp = self._order[self._next]
        if name != exp.name:
            raise BadInput(f"tensor {name} written out of plan order (expected {exp.name})")
        if dtype_code(tensor.dtype) != exp.dtype or tuple(tensor.shape) != exp.shape:
            raise BadInput(f"{name}: {dtype_code(tensor.dtype)}{tuple(tensor.shape)} differs from the plan "
                           f"{exp.dtype}{exp.shape}")  # fmt: skip
        data = tensor.detach().contiguous().cpu().reshape(-1).view(__import__("torch").uint8).numpy()
        self._f.write(memoryview(data))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._order):
            raise BadInput(f"{len(self._order) - self._next} planned tensors were never written")
        self._f.close()

    def abort(self) -> None:
        if self._f:
            self._f.close()
