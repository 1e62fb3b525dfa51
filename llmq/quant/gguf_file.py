"""A lean GGUF header reader and streaming writer for the quantizer.

The quantizer copies a model's metadata verbatim (tokenizer arrays included) and rewrites only the tensors, so
this reader keeps every key/value as its raw encoded bytes and decodes just the scalars and numeric arrays the
type rules need. gguf-py's GGUFReader builds a numpy view per array element, which takes seconds on a 50k-token
vocabulary; this takes milliseconds. Tensor data is read with ``pread`` (no mmap), so the resident memory stays
at about one tensor. Every length and offset read from the file is bounded before it is used.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmq.errors import CorruptFile

GGUF_MAGIC = b"GGUF"
_SCALAR = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_NP = {
    0: "<u1",
    1: "<i1",
    2: "<u2",
    3: "<i2",
    4: "<u4",
    5: "<i4",
    6: "<f4",
    7: "<u1",
    10: "<u8",
    11: "<i8",
    12: "<f8",
}
STRING, ARRAY, UINT32 = 8, 9, 4
_MAX_COUNT = 1 << 24


@dataclass(frozen=True)
class RawTensor:
    name: str
    type_id: int
    shape: tuple[int, ...]  # torch order
    offset: int  # absolute, in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        import gguf

        return gguf.GGMLQuantizationType(self.type_id).name


def _type_sizes(type_id: int) -> tuple[int, int]:
    import gguf

    try:
        return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(type_id)]
    except (ValueError, KeyError):
        raise CorruptFile(f"unknown ggml type id {type_id}") from None


class GGUFHeader:
    """Parsed header of a GGUF file: ``kv`` (decoded scalars/numeric arrays), ``kv_raw`` (key -> encoded bytes
    of the whole entry, in file order), ``tensors`` (in file order) and ``alignment``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            self._parse()
        except (struct.error, UnicodeDecodeError, ValueError) as e:
            os.close(self._fd)
            raise CorruptFile(f"{self.path}: malformed GGUF header ({e})") from None
        except BaseException:
            os.close(self._fd)
            raise

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> GGUFHeader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _parse(self) -> None:
        size = os.fstat(self._fd).st_size
        # metadata can be large (vocabularies) but is always far smaller than the tensors; read it in one go
        buf = os.pread(self._fd, min(size, 64 << 20), 0)
        while True:
            try:
                self._parse_buf(buf, size)
                return
            except _NeedMore:
                if len(buf) >= size:
                    raise CorruptFile(f"{self.path}: truncated GGUF header") from None
                buf = os.pread(self._fd, min(size, len(buf) * 4), 0)

    def _parse_buf(self, buf: bytes, size: int) -> None:
        if buf[:4] != GGUF_MAGIC:
            raise CorruptFile(f"{self.path} is not a GGUF file")
        r = _Cursor(buf)
        r.pos = 4
        self.version = r.unpack("<I")
        if self.version not in (2, 3):
            raise CorruptFile(f"{self.path}: unsupported GGUF version {self.version}")
        n_tensors, n_kv = r.unpack("<Q"), r.unpack("<Q")
        if n_tensors > _MAX_COUNT or n_kv > _MAX_COUNT:
            raise CorruptFile(f"{self.path}: implausible counts ({n_tensors} tensors, {n_kv} keys)")
        self.kv: dict[str, Any] = {}
        self.kv_raw: dict[str, bytes] = {}
        for _ in range(n_kv):
            start = r.pos
            key = r.string()
            vtype = r.unpack("<I")
            self.kv[key] = r.value(vtype)
            self.kv_raw[key] = buf[start : r.pos]
        self.alignment = int(self.kv.get("general.alignment", 32) or 32)
        if self.alignment <= 0 or self.alignment & (self.alignment - 1):
            raise CorruptFile(f"{self.path}: bad alignment {self.alignment}")
        infos = []
        for _ in range(n_tensors):
            name = r.string()
            nd = r.unpack("<I")
            if nd > 8:
                raise CorruptFile(f"{self.path}: tensor {name} has {nd} dimensions")
            dims = [r.unpack("<Q") for _ in range(nd)]
            type_id, off = r.unpack("<I"), r.unpack("<Q")
            infos.append((name, type_id, tuple(reversed(dims)), off))
        data_start = -(-r.pos // self.alignment) * self.alignment
        self.tensors: list[RawTensor] = []
        for name, type_id, shape, off in infos:
            blck, bsize = _type_sizes(type_id)
            numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
            if shape and shape[-1] % blck:
                raise CorruptFile(f"{self.path}: tensor {name} row {shape[-1]} is not a multiple of {blck}")
            nbytes = numel // blck * bsize
            if data_start + off + nbytes > size:
                raise CorruptFile(f"{self.path}: tensor {name} lies outside the file")
            self.tensors.append(RawTensor(name, type_id, shape, data_start + off, nbytes))

    def read(self, t: RawTensor) -> np.ndarray:
        """The tensor's raw bytes (uint8, a private copy)."""
        buf = bytearray(t.nbytes)
        view = memoryview(buf)
        done = 0
        while done < t.nbytes:
            n = os.preadv(self._fd, [view[done:]], t.offset + done)
            if n <= 0:
                raise CorruptFile(f"{self.path}: short read in tensor {t.name}")
            done += n
        return np.frombuffer(buf, dtype=np.uint8)


class _NeedMore(Exception):
    pass


class _Cursor:
    def __init__(self, buf: bytes):
        self.buf, self.pos = buf, 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise _NeedMore
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise _NeedMore
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return v

    def string(self) -> str:
        n = self.unpack("<Q")
        if n > _MAX_COUNT * 16:
            raise CorruptFile(f"implausible string length {n}")
        return self.take(n).decode("utf-8")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALAR:
            return self.unpack(_SCALAR[vtype])
        if vtype == STRING:
            return self.string()
        if vtype != ARRAY:
            raise CorruptFile(f"unknown GGUF value type {vtype}")
        etype, n = self.unpack("<I"), self.unpack("<Q")
        if n > _MAX_COUNT * 4:
            raise CorruptFile(f"implausible array length {n}")
        if etype in _NP:
            return np.frombuffer(self.take(n * np.dtype(_NP[etype]).itemsize), dtype=_NP[etype]).tolist()
        if etype == STRING:
            for _ in range(n):  # skipped, not decoded: only ever copied verbatim
                self.take(self.unpack("<Q"))
            return None
        for _ in range(n):
            self.value(etype)
        return None


def encode_kv(key: str, value: Any, vtype: int) -> bytes:
    """One scalar key/value entry in GGUF encoding."""
    k = key.encode()
    head = struct.pack("<Q", len(k)) + k + struct.pack("<I", vtype)
    if vtype == STRING:
        v = str(value).encode()
        return head + struct.pack("<Q", len(v)) + v
    return head + struct.pack(_SCALAR[vtype], value)


def write_gguf(
    path: str | os.PathLike,
    kv_entries: Iterable[bytes],
    tensors: list[tuple[str, int, tuple[int, ...], int]],
    data: Iterator[np.ndarray],
    alignment: int = 32,
    version: int = 3,
) -> None:
    """Write a GGUF file: encoded kv entries, tensor infos (name, ggml type id, torch shape, nbytes) and then the
    tensors' bytes from ``data`` in the same order, each padded to ``alignment`` (as ggml's gguf writer does)."""
    kv = list(kv_entries)
    out = [GGUF_MAGIC, struct.pack("<IQQ", version, len(tensors), len(kv)), *kv]
    offset = 0
    for name, type_id, shape, nbytes in tensors:
        nb = name.encode()
        dims = tuple(reversed(shape)) or (1,)
        out += [struct.pack("<Q", len(nb)), nb, struct.pack("<I", len(dims)), struct.pack(f"<{len(dims)}Q", *dims),
                struct.pack("<IQ", type_id, offset)]  # fmt: skip
        offset += -(-nbytes // alignment) * alignment
    header = b"".join(out)
    header += b"\0" * (-len(header) % alignment)
    with open(path, "wb") as f:
        f.write(header)
        for (name, _, _, nbytes), arr in zip(tensors, data, strict=True):
            b = np.ascontiguousarray(arr).view(np.uint8).reshape(-1)
            if b.size != nbytes:
                raise ValueError(f"tensor {name}: {b.size} bytes, planned {nbytes}")
            f.write(memoryview(b))
            f.write(b"\0" * (-nbytes % alignment))
