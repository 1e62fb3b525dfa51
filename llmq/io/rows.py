"""Reading a tensor's rows from disk (pread, no mmap) and turning raw rows into float32.

Shared by both formats: a tensor is ``rows × row_bytes`` contiguous bytes at ``info.offset`` in ``info.file``.
Pipelines read big tensors a slice of rows at a time so resident memory stays at a few MB per step, not a whole
embedding matrix plus its float32 copies.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np

from llmq.errors import CorruptFile, UnsupportedType
from llmq.io.base import TensorInfo, TensorTable
from llmq.io.ggml_types import NUMPY_DTYPES, is_block_type

CHUNK_ELEMENTS = 1 << 22  # 4M elements: 16 MiB of float32 per step


def n_rows(info: TensorInfo) -> int:
    return info.numel // info.shape[-1] if info.shape and info.shape[-1] else 1


def read_rows(info: TensorInfo, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Rows [start, stop) as a fresh array: [rows, *inner] elements for plain types, [rows, row_bytes] uint8
    for ggml block types (the whole tensor, in its own shape, when start=0 and stop=None)."""
    if info.file is None or info.offset is None:
        raise ValueError(f"tensor {info.name} has no location")
    rows = n_rows(info)
    stop = rows if stop is None else stop
    row_bytes = info.nbytes // rows if rows else 0
    count = (stop - start) * row_bytes
    buf = np.empty(count, dtype=np.uint8)
    with open(info.file, "rb") as f:
        f.seek(info.offset + start * row_bytes)
        if f.readinto(memoryview(buf)) != count:
            raise CorruptFile(f"{Path(info.file).name}: tensor {info.name} is truncated")
    if is_block_type(info.dtype):
        return buf.reshape(stop - start, row_bytes)
    arr = buf.view(np.dtype(NUMPY_DTYPES[info.dtype]))
    if start == 0 and stop == rows:
        return arr.reshape(info.shape)
    return arr.reshape(stop - start, *info.shape[-1:])


def row_range(info: TensorInfo, start: int, stop: int) -> TensorInfo:
    """The location of rows [start, stop) of ``info`` (rows of its last dimension) as a 2-D tensor of its own."""
    if info.offset is None:
        raise ValueError(f"tensor {info.name} has no location")
    rows = n_rows(info)
    if not 0 <= start <= stop <= rows:
        raise ValueError(f"rows [{start}, {stop}) are outside tensor {info.name} ({rows} rows)")
    row_bytes = info.nbytes // rows if rows else 0
    return replace(info, shape=(stop - start, *info.shape[-1:]), nbytes=(stop - start) * row_bytes,
                   offset=info.offset + start * row_bytes)  # fmt: skip


def map_rows(info: TensorInfo) -> np.ndarray:
    """The whole tensor as ``read_rows`` returns it, but a read-only view of a memory map of just its bytes: no
    copy and no fresh pages (the page cache's are mapped as they are touched, as llama.cpp reads its input),
    unmapped when the array is dropped, so resident memory stays bounded by the tensors held."""
    import mmap

    if info.file is None or info.offset is None:
        raise ValueError(f"tensor {info.name} has no location")
    if not info.nbytes:
        return read_rows(info)
    base = info.offset - info.offset % mmap.ALLOCATIONGRANULARITY
    with open(info.file, "rb") as f:
        try:  # mmap checks the range against the file size (a truncated file raises, never SIGBUS)
            m = mmap.mmap(f.fileno(), info.offset + info.nbytes - base, offset=base, access=mmap.ACCESS_READ)
        except ValueError:
            raise CorruptFile(f"{Path(info.file).name}: tensor {info.name} is truncated") from None
    buf = np.frombuffer(m, dtype=np.uint8, count=info.nbytes, offset=info.offset - base)
    rows = n_rows(info)
    if is_block_type(info.dtype):
        return buf.reshape(rows, info.nbytes // rows if rows else 0)
    return buf.view(np.dtype(NUMPY_DTYPES[info.dtype])).reshape(info.shape)


def row_chunks(
    info: TensorInfo, multiple: int = 1, max_elements: int = CHUNK_ELEMENTS
) -> Iterator[tuple[int, int]]:
    """(start, stop) row ranges covering the tensor, each a multiple of ``multiple`` rows (e.g. a head)."""
    rows = n_rows(info)
    row_len = info.shape[-1] if info.shape else 1
    step = max(multiple, (max_elements // max(1, row_len)) // multiple * multiple)
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values of raw rows/elements of ``dtype`` (dequantizing ggml block types with gguf-py)."""
    if dtype == "F32":
        return raw
    if dtype == "BF16":
        # bf16 is the high half of a little-endian float32: interleave with zeros (2x faster than a shift)
        out = (
            np.zeros(raw.shape[:-1] + (raw.shape[-1] * 2,), dtype=np.uint16)
            if raw.ndim
            else np.zeros(2, np.uint16)
        )
        out[..., 1::2] = raw
        return out.view(np.float32)
    if dtype in ("F16", "F64", "I8", "I16", "I32", "I64"):
        return raw.astype(np.float32)
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    try:
        return np.asarray(dequantize(raw, GGMLQuantizationType[dtype]), dtype=np.float32)
    except (NotImplementedError, KeyError):
        raise UnsupportedType(f"gguf-py cannot dequantize {dtype}") from None


PLAIN_FLOAT = ("F32", "F16", "BF16")


def from_float32(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values as ``dtype`` (F32, F16 or BF16 as its uint16 bit patterns), the one cast of llmq: round
    to nearest even as ggml's fp32→fp16/bf16, overflow to ±inf, NaNs kept (quiet) NaNs."""
    if dtype == "F32":
        return x.astype(np.float32, copy=False)
    if dtype == "F16":
        with np.errstate(over="ignore"):  # overflow to ±inf is the IEEE result, as in ggml
            return x.astype(np.float16)
    if dtype != "BF16":
        raise UnsupportedType(f"{dtype} is not a plain float type")
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    r = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)  # wraps only for NaNs, replaced below
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    if nan.any():
        r[nan] = ((u[nan] >> 16) | 64).astype(np.uint16)
    return r


class FileTensorReader(TensorTable):
    """A reader whose tensors are byte ranges of files (safetensors, GGUF): raw rows, float32 values."""

    def read_raw(self, name: str) -> np.ndarray:
        return read_rows(self.info(name))

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        return read_rows(self.info(name), start, stop)

    def read_float(self, name: str, mapped: bool = False) -> np.ndarray:
        """The tensor as float32 numpy (ggml block types dequantized), in torch shape. ``mapped``: read-only,
        over a memory map of the file where the stored type is float32 already (see :func:`map_rows`)."""
        info = self.info(name)
        try:
            return to_float32(map_rows(info) if mapped else read_rows(info), info.dtype).reshape(info.shape)
        except UnsupportedType as e:
            raise UnsupportedType(f"{e} (tensor {name})") from None
