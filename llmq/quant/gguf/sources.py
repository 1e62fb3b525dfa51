"""What the ``gguf`` quantizer reads: a GGUF file, or an HF directory streamed through the converter's plan.

Both give the quantizer the same view: metadata in order with its value types, the tensors' infos (GGUF names,
torch shapes, source types), whole tensors kept as they are (``raw``) and float32 rows for the encoders
(``rows``, called in the forked encoder processes). An HF directory is seen exactly as the f32 GGUF that
``llmq convert --outtype f32`` would write, without writing it: each job's rows are read from the safetensors
files, permuted (q/k), cast and shifted as the converter does, straight into the encoders.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from llmq.io.base import TensorInfo
from llmq.quant.gguf.workers import RowReader, mapped_rows


class GGUFSource:
    """A GGUF input through llmq.io's reader: metadata (with its value types, in order), tensor infos, data."""

    hf_dir: Path | None = None

    def __init__(self, path: Path):
        from llmq.io.gguf import GGUFReader

        self.path = path
        # vocabularies are copied to the output byte for byte, never decoded and re-encoded
        self.reader = GGUFReader(path, decode_strings="raw")
        self.meta = self.reader.metadata
        self.kv_types = self.reader.kv_types
        _check_family(self.meta, path.name)
        self.alignment = self.reader.alignment
        self.rows: RowReader = mapped_rows

    @property
    def input_bytes(self) -> int:
        return self.path.stat().st_size

    def infos(self) -> list[TensorInfo]:
        return list(self.reader.infos())

    def header_bytes(self, infos: list[TensorInfo]) -> int:
        """Bytes of the source besides tensor data (its header, metadata and padding)."""
        return self.path.stat().st_size - sum(t.nbytes for t in infos)

    def raw(self, name: str) -> np.ndarray:
        return self.reader.read_raw(name)

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> GGUFSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class HFSource(GGUFSource):
    """An HF directory as the f32 GGUF llmq's converter would make of it, read tensor rows by tensor rows."""

    def __init__(self, path: Path):
        from llmq.conversion import plan_hf_to_gguf
        from llmq.io.ggml_types import GGUF_DEFAULT_ALIGNMENT
        from llmq.io.gguf import GGUFFileWriter

        self.path = self.hf_dir = path
        self.plan = plan_hf_to_gguf(path, "f32")
        self.reader = self.plan.reader
        kv = GGUFFileWriter(os.devnull)  # only collects the metadata (with the value types it would write)
        self.plan.add_metadata(kv)
        self.meta = {k: v for k, (v, _, _) in kv.metadata.items()}
        self.kv_types = {k: (t, sub) for k, (_, t, sub) in kv.metadata.items()}
        self.alignment = GGUF_DEFAULT_ALIGNMENT
        self._extra = {t.name: data for t, data in self.plan.extra}
        self._planned = {p.target.name: p for p in self.plan.tensors}
        self.rows = self._rows

    @property
    def input_bytes(self) -> int:
        return sum(p.src.nbytes for p in self.plan.tensors)

    def infos(self) -> list[TensorInfo]:
        return self.plan.infos()

    def header_bytes(self, infos: list[TensorInfo]) -> int:
        """Bytes of the GGUF header the converter would write: the metadata as packed, one record per tensor."""
        from llmq.io.gguf import pack_value

        kv = sum(
            8 + len(k.encode()) + 4 + len(pack_value(self.meta[k], t, sub))
            for k, (t, sub) in self.kv_types.items()
        )
        records = sum(8 + len(t.name.encode()) + 4 + 8 * max(1, len(t.shape)) + 12 for t in infos)
        return 24 + kv + records + self.alignment

    def raw(self, name: str) -> Any:
        if name in self._extra:
            return self._extra[name]
        p = self._planned[name]
        return p.float_rows(0, p.src.numel // p.src.shape[-1] if p.src.shape else 1)

    def _rows(self, info: TensorInfo, start: int, stop: int) -> np.ndarray:
        if info.name in self._extra:
            data = self._extra[info.name]
            return data.reshape(-1, data.shape[-1])[start:stop]
        return self._planned[info.name].float_rows(start, stop)


def _check_family(meta: Any, name: str) -> None:
    """A GGUF of a family llmq knows must carry consistent hyperparameters (refused before any work)."""
    from llmq.archs import FAMILIES
    from llmq.archs.validate import check_gguf_kv

    family = FAMILIES.get(str(meta.get("general.architecture", "")))
    if family is not None:
        check_gguf_kv(family, meta, name)


def open_source(src: Path) -> GGUFSource:
    """The quantizer's view of ``src``: an HF directory streamed, or a GGUF file."""
    return HFSource(src) if src.is_dir() else GGUFSource(src)
