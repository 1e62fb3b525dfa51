"""GGUF reading and writing, single files and llama.cpp splits (``*-00001-of-0000N.gguf``).

The parser treats the file as untrusted: every count and length is bounded by the bytes that remain before it
is used, offsets must fall inside the data section, tensors may not overlap, and unknown types are rejected.
It imports neither torch nor gguf-py (header reads must be fast); reads return fresh arrays (pread), so the
resident memory of a streaming pipeline is bounded by the tensors it holds, not by what it has read.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llmq.errors import BadInput, CorruptFile
from llmq.io import limits
from llmq.io.base import TensorInfo, WriteBehind, check_no_overlap, group_by_size, write_tensor
from llmq.io.ggml_types import (
    GGML_MAX_DIMS,
    GGML_TYPE_BY_ID,
    GGML_TYPES,
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    NUMPY_SCALARS,
    SCALAR_FORMATS,
    GGUFValueType,
    is_block_type,
)
from llmq.io.paths import check_inside
from llmq.io.readat import HeaderStream, ReadAt, file_read_at
from llmq.io.rows import FileTensorReader

SPLIT_RE = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_SCALARS = {vt: struct.Struct(fmt) for vt, fmt in SCALAR_FORMATS.items()}
_INTEGER_TYPES = {
    GGUFValueType[n] for n in ("UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "UINT64", "INT64")
}


class SkippedStrings:
    """Stands for a string array that was not decoded (header-only users: inspect, the estimator)."""

    def __init__(self, count: int):
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return f"[{self.count} strings]"


class RawStrings:
    """A string array kept as its serialized GGUF bytes (u64 length + UTF-8, per string): a writer copies it
    out unchanged, without decoding and re-encoding a 100k-token vocabulary; iterating decodes it."""

    def __init__(self, count: int, data: bytes):
        self.count = count
        self.data = data

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[str]:
        buf, pos = self.data, 0
        for _ in range(self.count):
            (n,) = _U64.unpack_from(buf, pos)
            yield buf[pos + 8 : pos + 8 + n].decode("utf-8", errors="surrogateescape")
            pos += 8 + n

    def __getitem__(self, i):
        return list(self)[i]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, RawStrings):
            return self.count == other.count and self.data == other.data
        return list(self) == other

    def __repr__(self) -> str:
        return f"[{self.count} strings]"


_ARRAY_STRUCTS = {nd: struct.Struct(f"<{nd}QIQ") for nd in range(1, GGML_MAX_DIMS + 1)}


class GGUFHeader:
    """A parsed GGUF header: version, metadata (with value types), alignment and tensor infos.

    Built by :func:`parse_gguf_header` from a ``read_at`` callable, in fixed-size reads bounded by
    llmq.io.limits: memory and time depend on the caps, never on the counts or lengths a file declares.
    """

    version: int
    kv: dict[str, Any]
    kv_types: dict[str, tuple[GGUFValueType, GGUFValueType | None]]
    alignment: int
    data_start: int
    tensors: dict[str, TensorInfo]


class _Parser:
    def __init__(self, read_at: ReadAt, name: str, decode_strings: bool | str):
        self.s = HeaderStream(
            read_at, name, limits.GGUF_MAX_HEADER_BYTES, limits.GGUF_READ_CHUNK, "GGUF header"
        )
        self.name = name
        self.decode_strings = decode_strings
        self.elements = 0  # array elements materialized so far (all arrays)
        self.nested = 0  # elements of arrays of arrays so far

    def fail(self, msg: str) -> CorruptFile:
        return CorruptFile(f"{self.name}: {msg}")

    def unpack(self, st: struct.Struct, what: str):
        return st.unpack(self.s.take(st.size, what))[0]

    def string(self, what: str, cap: int = limits.MAX_STRING_BYTES) -> str:
        n = self.unpack(_U64, what)
        if n > cap:
            raise self.fail(f"{what}: string of {n} bytes exceeds the {cap}-byte limit")
        # surrogateescape keeps invalid UTF-8 (it happens in byte-level vocabularies) round-trippable
        return self.s.take(n, what).decode("utf-8", errors="surrogateescape")

    def string_array(self, count: int, what: str) -> list[str] | SkippedStrings | RawStrings:
        # the hot path of every header (vocabularies of 100k+ tokens and merges): one tight loop over the
        # current chunk, refilled in place when a string crosses its end
        s, unpack, cap = self.s, _U64.unpack_from, limits.MAX_STRING_BYTES
        decode, raw = self.decode_strings is True, self.decode_strings == "raw"
        out: list[str] = []
        parts: list[bytes] = []
        buf, off = s.buf, s.pos - s.buf_start
        seg = off
        for _ in range(count):
            if off + 8 > len(buf):
                if raw:
                    parts.append(buf[seg:off])
                s.pos = s.buf_start + off
                s.fill(8)
                buf, off = s.buf, s.pos - s.buf_start
                seg = off
                if off + 8 > len(buf):
                    raise self.fail(f"truncated GGUF header (reading {what} at byte {s.pos})")
            (n,) = unpack(buf, off)
            if n > cap:
                raise self.fail(f"{what}: string of {n} bytes exceeds the {cap}-byte limit")
            if off + 8 + n > len(buf):
                if raw:
                    parts.append(buf[seg:off])
                s.pos = s.buf_start + off
                s.fill(8 + n)
                buf, off = s.buf, s.pos - s.buf_start
                seg = off
                if off + 8 + n > len(buf):
                    raise self.fail(f"truncated GGUF header (reading {what} at byte {s.pos})")
            if decode:
                out.append(buf[off + 8 : off + 8 + n].decode("utf-8", errors="surrogateescape"))
            off += 8 + n
        if raw:
            parts.append(buf[seg:off])
        s.pos = s.buf_start + off
        if raw:
            return RawStrings(count, b"".join(parts))
        return out if decode else SkippedStrings(count)

    def value(self, vt: GGUFValueType, what: str, depth: int = 0) -> tuple[Any, GGUFValueType | None]:
        """(value, element type of an array or None)."""
        if vt == GGUFValueType.STRING:
            return self.string(what), None
        if vt != GGUFValueType.ARRAY:
            st = _SCALARS[vt]
            return self.unpack(st, what), None
        if depth >= limits.GGUF_MAX_NESTING:
            raise self.fail(f"{what}: arrays nested more than {limits.GGUF_MAX_NESTING} deep")
        sub = self.vtype(self.unpack(_U32, what), what, "array type")
        count = self.unpack(_U64, what)
        if count > limits.GGUF_MAX_ARRAY_ELEMENTS:
            raise self.fail(
                f"{what}: array of {count} elements exceeds the {limits.GGUF_MAX_ARRAY_ELEMENTS} limit"
            )
        self.elements += count
        if self.elements > limits.GGUF_MAX_TOTAL_ELEMENTS:
            raise self.fail(
                f"{what}: more than {limits.GGUF_MAX_TOTAL_ELEMENTS} array elements in the header"
            )
        if sub == GGUFValueType.STRING:
            return self.string_array(count, what), sub
        if sub in NUMPY_SCALARS:
            dt = np.dtype(NUMPY_SCALARS[sub])
            arr = np.frombuffer(self.s.take(count * dt.itemsize, what), dtype=dt)
            return arr.tolist(), sub
        self.nested += count
        if self.nested > limits.GGUF_MAX_NESTED_ELEMENTS:
            raise self.fail(
                f"{what}: more than {limits.GGUF_MAX_NESTED_ELEMENTS} elements in arrays of arrays"
            )
        return [self.value(sub, what, depth + 1)[0] for _ in range(count)], sub

    def vtype(self, code: int, what: str, kind: str = "value type") -> GGUFValueType:
        try:
            return GGUFValueType(code)
        except ValueError:
            raise self.fail(f"{what}: unknown GGUF {kind} {code}") from None

    def tensor_records(self, count: int) -> list[tuple[str, tuple[int, ...], int, int]]:
        """(name, dims, ggml type id, offset) of each record, in one loop over the current chunk."""
        s, u64, u32 = self.s, _U64.unpack_from, _U32.unpack_from
        name_cap = limits.MAX_NAME_BYTES
        out = []
        buf, off = s.buf, s.pos - s.buf_start
        for i in range(count):
            # the longest record: name length, name, n_dims, GGML_MAX_DIMS dims, type, offset
            need = 8 + name_cap + 4 + 8 * GGML_MAX_DIMS + 12
            if off + need > len(buf):
                s.pos = s.buf_start + off
                s.fill(min(need, s.limit - s.pos))
                buf, off = s.buf, s.pos - s.buf_start
            what = f"tensor record #{i}"
            if off + 8 > len(buf):
                raise self.fail(f"truncated GGUF header (reading {what} at byte {s.buf_start + off})")
            (n,) = u64(buf, off)
            if n > name_cap:
                raise self.fail(f"{what}: name of {n} bytes exceeds the {name_cap}-byte limit")
            if off + 12 + n > len(buf):
                raise self.fail(f"truncated GGUF header (reading {what} at byte {s.buf_start + off})")
            name = buf[off + 8 : off + 8 + n].decode("utf-8", errors="surrogateescape")
            off += 8 + n
            (nd,) = u32(buf, off)
            off += 4
            st = _ARRAY_STRUCTS.get(nd)
            if st is None:
                raise self.fail(f"tensor {name} has {nd} dimensions")
            if off + st.size > len(buf):
                raise self.fail(f"truncated GGUF header (reading tensor {name} at byte {s.buf_start + off})")
            *dims, type_id, offset = st.unpack_from(buf, off)
            off += st.size
            out.append((name, dims, type_id, offset))
        s.pos = s.buf_start + off
        return out


def parse_gguf_header(read_at: ReadAt, name: str, size: int | None = None, decode_strings: bool | str = True,
                      file: str | None = None) -> GGUFHeader:  # fmt: skip
    """Parse a GGUF header through ``read_at``. ``name`` labels errors; ``size`` (when known) lets tensor data
    be checked against the end of the file; ``file`` goes into each TensorInfo (default: ``name``)."""
    p = _Parser(read_at, name, decode_strings)
    h = GGUFHeader()
    if p.s.take(4, "magic") != GGUF_MAGIC:
        raise p.fail("not a GGUF file (bad magic)")
    h.version = p.unpack(_U32, "version")
    if h.version not in (2, 3):
        raise p.fail(f"unsupported GGUF version {h.version}")
    n_tensors = p.unpack(_U64, "tensor count")
    n_kv = p.unpack(_U64, "metadata count")
    if n_tensors > limits.MAX_TENSORS or n_kv > limits.MAX_METADATA_KEYS:
        raise p.fail(
            f"header declares {n_tensors} tensors and {n_kv} keys, more than the limits "
            f"({limits.MAX_TENSORS} tensors, {limits.MAX_METADATA_KEYS} keys)"
        )
    # each KV takes at least 8+4 bytes, each tensor info at least 8+4+8+4+8
    if size is not None and (n_kv * 12 > size or n_tensors * 32 > size):
        raise p.fail(
            f"header declares {n_tensors} tensors and {n_kv} keys, more than a {size}-byte "
            "file can hold (truncated or corrupt)"
        )
    h.kv, h.kv_types = {}, {}
    for i in range(n_kv):
        key = p.string(f"key #{i}", limits.MAX_NAME_BYTES)
        vt = p.vtype(p.unpack(_U32, f"type of {key}"), key)
        if key in h.kv:
            raise p.fail(f"duplicate key {key}")
        h.kv[key], sub = p.value(vt, key)
        h.kv_types[key] = (vt, sub)
    alignment = h.kv.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    a_type = h.kv_types.get("general.alignment", (GGUFValueType.UINT32, None))[0]
    if a_type not in _INTEGER_TYPES or alignment <= 0 or alignment & (alignment - 1) or alignment > 1 << 20:
        raise p.fail(f"invalid general.alignment {alignment!r} ({a_type.name})")
    h.alignment = alignment
    records = p.tensor_records(n_tensors)
    h.data_start = _align(p.s.pos, alignment)
    data_size = None if size is None else size - h.data_start
    if data_size is not None and data_size < 0:
        raise p.fail("truncated before the tensor data")
    h.tensors = {}
    file = name if file is None else file
    for tname, dims, type_id, offset in records:
        info = _tensor_info(p, h, file, tname, dims, type_id, offset, data_size)
        if tname in h.tensors:
            raise p.fail(f"duplicate tensor {tname}")
        h.tensors[tname] = info
    check_no_overlap(h.tensors.values(), name)
    return h


def _tensor_info(p: _Parser, h: GGUFHeader, file: str, name: str, dims: list[int], type_id: int, offset: int,
                 data_size: int | None) -> TensorInfo:  # fmt: skip
    tname = GGML_TYPE_BY_ID.get(type_id)
    if tname is None:
        raise p.fail(f"tensor {name} has unknown ggml type {type_id}")
    _, blk, bsize = GGML_TYPES[tname]
    numel = 1
    for d in dims:
        if d > limits.MAX_DIM:
            raise p.fail(f"tensor {name} has an absurd dimension {d}")
        numel *= d
    if dims[0] % blk:
        raise p.fail(f"tensor {name} row of {dims[0]} is not a multiple of {tname} blocks")
    nbytes = numel // blk * bsize
    if offset % h.alignment:
        raise p.fail(f"tensor {name} data offset {offset} is not aligned")
    if data_size is not None and offset + nbytes > data_size:
        raise p.fail(f"tensor {name} data lies past the end of the file (truncated?)")
    shape = tuple(reversed(dims))  # GGUF stores ne[0] (the row length) first
    return TensorInfo(name, tname, shape, nbytes, file, h.data_start + offset)


class GGUFFile(GGUFHeader):
    """The parsed header of one local GGUF file."""

    def __init__(self, path: Path, decode_strings: bool | str = True):
        self.path = path
        self.decode_strings = decode_strings
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise BadInput(f"no such file: {path}") from None
        if size < 24:
            raise CorruptFile(f"{path.name}: too small to be a GGUF file ({size} bytes)")
        self.size = size
        h = parse_gguf_header(file_read_at(path), path.name, size, decode_strings, file=str(path))
        self.__dict__.update(vars(h))


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def split_paths(path: Path) -> list[Path]:
    """All files of a split GGUF given any one of them, or [path] for a single file."""
    m = SPLIT_RE.match(path.name)
    if not m:
        return [path]
    count = int(m["count"])
    if not 1 <= count <= 9999:
        raise BadInput(f"{path.name}: bad split count")
    paths = [path.with_name(f"{m['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        raise BadInput(f"split GGUF is incomplete: missing {', '.join(missing[:3])}")
    for p in paths:
        if (
            p.name != path.name
        ):  # the part the user named is theirs to choose; the others are found through it
            check_inside(p, path.parent)
    return paths


class GGUFReader(FileTensorReader):
    """Reader over a GGUF file or a complete llama.cpp split (metadata from the first split)."""

    kind = "gguf"
    config = None

    def __init__(self, path: str | os.PathLike, decode_strings: bool | str = True):
        """``decode_strings=False`` leaves string arrays (vocabularies, merges) as :class:`SkippedStrings`,
        ``"raw"`` as :class:`RawStrings` (their bytes, for copying them to another GGUF)."""
        self.path = Path(path)
        self.files = [GGUFFile(p, decode_strings) for p in split_paths(self.path)]
        first = self.files[0]
        self.metadata: dict[str, Any] = {k: v for k, v in first.kv.items() if not k.startswith("split.")}
        self.kv_types = {k: v for k, v in first.kv_types.items() if not k.startswith("split.")}
        self.version = first.version
        self.alignment = first.alignment
        self._infos: dict[str, TensorInfo] = {}
        for gf in self.files:
            for name, info in gf.tensors.items():
                if name in self._infos:
                    raise CorruptFile(f"{gf.path.name}: tensor {name} appears in two splits")
                self._infos[name] = info
        expected = first.kv.get("split.tensors.count")
        if expected is not None and expected != len(self._infos):
            raise CorruptFile(
                f"{self.path.name}: split declares {expected} tensors, found {len(self._infos)}"
            )

    @property
    def arch(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def read(self, name: str, dequantize: bool = True):
        import torch

        info = self.info(name)
        if is_block_type(info.dtype):
            arr = self.read_float(name) if dequantize else self.read_raw(name)
            return torch.from_numpy(arr)
        raw = self.read_raw(name)
        if info.dtype == "BF16":
            return torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(raw)


# ----------------------------------------------------------------------------------------------------------------
# Writing


def _infer_vtype(value: Any) -> tuple[GGUFValueType, GGUFValueType | None]:
    if isinstance(value, bool):
        return GGUFValueType.BOOL, None
    if isinstance(value, int):
        return (GGUFValueType.UINT32 if 0 <= value < 1 << 32 else GGUFValueType.INT64), None
    if isinstance(value, float):
        return GGUFValueType.FLOAT32, None
    if isinstance(value, (str, bytes)):
        return GGUFValueType.STRING, None
    if isinstance(value, RawStrings):
        return GGUFValueType.ARRAY, GGUFValueType.STRING
    if isinstance(value, (list, tuple)):
        if not value:
            return GGUFValueType.ARRAY, GGUFValueType.INT32
        sub, _ = _infer_vtype(value[0])
        if sub == GGUFValueType.UINT32 and any(isinstance(v, int) and v < 0 for v in value):
            sub = GGUFValueType.INT32
        if sub == GGUFValueType.UINT32:
            sub = GGUFValueType.INT32
        return GGUFValueType.ARRAY, sub
    raise BadInput(f"cannot store a {type(value).__name__} in GGUF metadata")


def _pack_string(s: str | bytes) -> bytes:
    b = s if isinstance(s, bytes) else s.encode("utf-8", errors="surrogateescape")
    return struct.pack("<Q", len(b)) + b


def pack_value(value: Any, vtype: GGUFValueType, sub: GGUFValueType | None = None) -> bytes:
    if vtype == GGUFValueType.STRING:
        return _pack_string(value if isinstance(value, bytes) else str(value))
    if vtype == GGUFValueType.ARRAY:
        if sub is None:
            _, sub = _infer_vtype(value)
        assert sub is not None
        head = struct.pack("<IQ", int(sub), len(value))
        if sub in NUMPY_SCALARS:
            return head + np.asarray(value, dtype=np.dtype(NUMPY_SCALARS[sub])).tobytes()
        if sub == GGUFValueType.STRING:
            if isinstance(value, RawStrings):
                return head + value.data
            return head + b"".join(_pack_string(v) for v in value)
        return head + b"".join(pack_value(v, GGUFValueType.ARRAY) for v in value)
    return struct.pack(SCALAR_FORMATS[vtype], value)


class GGUFFileWriter:
    """Streams a GGUF file: add metadata, ``plan`` the tensors, ``write`` them in order, ``close``.

    The header (with every offset) is written at ``plan`` time; each ``write`` appends one tensor's bytes, so
    memory holds one tensor at a time. With ``split_max_bytes`` the output is a llama.cpp split
    (``stem-00001-of-0000N.gguf`` ...; ``path`` names the stem file ``stem.gguf``).
    """

    def __init__(self, path: str | os.PathLike, arch: str | None = None, *, alignment: int = 32,
                 split_max_bytes: int | None = None):  # fmt: skip
        self.path = Path(path)
        self.alignment = alignment
        self.split_max_bytes = split_max_bytes
        self._kv: dict[str, tuple[Any, GGUFValueType, GGUFValueType | None]] = {}
        self._plan: list[tuple[Path, list[TensorInfo]]] = []
        if arch is not None:
            self.add("general.architecture", arch)
        self._queue: list[TensorInfo] = []
        self._fh = None
        self._file_idx = -1
        self.paths: list[Path] = []

    def add(self, key: str, value: Any, vtype: GGUFValueType | None = None,
            sub: GGUFValueType | None = None) -> None:  # fmt: skip
        if self._plan:
            raise RuntimeError("metadata must be added before plan()")
        if vtype is None:
            vtype, sub2 = _infer_vtype(value)
            sub = sub if sub is not None else sub2
        self._kv[key] = (value, vtype, sub)

    @property
    def metadata(self) -> dict[str, tuple[Any, GGUFValueType, GGUFValueType | None]]:
        """The key-value pairs added so far, in order: key -> (value, value type, array item type)."""
        return dict(self._kv)

    def plan(self, infos: Sequence[TensorInfo]) -> None:
        if self._plan:
            raise RuntimeError("plan() called twice")
        for t in infos:
            if t.dtype not in GGML_TYPES:
                raise BadInput(f"tensor {t.name}: {t.dtype} is not a ggml type")
        groups = group_by_size(infos, self.split_max_bytes)
        n = len(groups)
        if self.split_max_bytes and n > 1:
            stem = self.path.name.removesuffix(".gguf")
            paths = [self.path.with_name(f"{stem}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]
        else:
            paths = [self.path]
        self._plan = list(zip(paths, groups))
        self.paths = paths
        self._queue = [t for g in groups for t in g]
        self._queue.reverse()
        self._file_of = {t.name: i for i, g in enumerate(groups) for t in g}
        self._open_next()

    def _open_next(self) -> None:
        if self._fh is not None:
            self._finish_file()
        self._file_idx += 1
        path, tensors = self._plan[self._file_idx]
        n_files = len(self._plan)
        kv = dict(self._kv) if self._file_idx == 0 else {}
        if n_files > 1:
            kv["split.no"] = (self._file_idx, GGUFValueType.UINT16, None)
            kv["split.count"] = (n_files, GGUFValueType.UINT16, None)
            kv["split.tensors.count"] = (sum(len(g) for _, g in self._plan), GGUFValueType.INT32, None)
        if self.alignment != 32:
            kv["general.alignment"] = (self.alignment, GGUFValueType.UINT32, None)
        parts = [GGUF_MAGIC, struct.pack("<IQQ", 3, len(tensors), len(kv))]
        for key, (value, vtype, sub) in kv.items():
            parts.append(_pack_string(key) + struct.pack("<I", int(vtype)) + pack_value(value, vtype, sub))
        offset = 0
        for t in tensors:
            dims = list(reversed(t.shape)) or [1]
            parts.append(_pack_string(t.name) + struct.pack("<I", len(dims)))
            parts.append(struct.pack(f"<{len(dims)}Q", *dims))
            parts.append(struct.pack("<IQ", GGML_TYPES[t.dtype][0], offset))
            offset = _align(offset + t.nbytes, self.alignment)
        header = b"".join(parts)
        header += b"\0" * (_align(len(header), self.alignment) - len(header))
        self._fh = open(path, "wb")
        self._sync = WriteBehind(self._fh)
        self._fh.write(header)

    def write(self, name: str, data) -> None:
        if not self._queue:
            raise RuntimeError(f"write({name}) after every planned tensor was written")
        expected = self._queue[-1]
        if expected.name != name:
            raise RuntimeError(
                f"tensors must be written in planned order: expected {expected.name}, got {name}"
            )
        while self._file_of[name] != self._file_idx:
            self._open_next()
        assert self._fh is not None
        write_tensor(self._fh, name, data, expected.nbytes)
        pad = _align(expected.nbytes, self.alignment) - expected.nbytes
        if pad:
            self._fh.write(b"\0" * pad)
        self._sync.wrote(expected.nbytes + pad)
        self._queue.pop()

    def _finish_file(self) -> None:
        assert self._fh is not None
        self._fh = None
        self._sync.close()

    def close(self) -> list[Path]:
        if self._queue:
            raise RuntimeError(f"{len(self._queue)} planned tensors were never written")
        if self._fh is not None:
            self._finish_file()
        while self._file_idx + 1 < len(
            self._plan
        ):  # splits with no tensors left (cannot happen, but be exact)
            self._open_next()
            self._finish_file()
        return self.paths

    def abort(self) -> None:
        if self._fh is not None:
            self._sync.join()
            self._fh.close()
            self._fh = None
        for p in self.paths:
            if p.exists():
                p.unlink()


def gguf_kv_items(meta: Mapping[str, Any], types: Mapping[str, tuple[GGUFValueType, GGUFValueType | None]]):
    """(key, value, vtype, sub) for copying metadata from a reader to a writer with the original types."""
    for k, v in meta.items():
        vt, sub = types.get(k, (None, None))
        yield k, v, vt, sub
