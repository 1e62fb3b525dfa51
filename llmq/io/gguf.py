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
from llmq.io.rows import FileTensorReader

SPLIT_RE = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
MAX_STRING = 1 << 30  # no GGUF key, token or template is a GiB long
MAX_NESTING = 4
_U64 = struct.Struct("<Q")


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


class _Cursor:
    """Bounded little-endian reads from a bytes-like header region."""

    def __init__(self, buf: bytes, path: Path, decode_strings: bool | str = True):
        self.buf = buf
        self.pos = 0
        self.path = path
        self.decode_strings = decode_strings

    def _need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            raise CorruptFile(f"{self.path.name}: truncated GGUF header (reading {what} at byte {self.pos})")

    def unpack(self, fmt: str, what: str):
        size = struct.calcsize(fmt)
        self._need(size, what)
        val = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return val

    def string(self, what: str) -> str:
        n = self.unpack("<Q", what)
        if n > MAX_STRING:
            raise CorruptFile(f"{self.path.name}: absurd string length {n} in {what}")
        self._need(n, what)
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        # surrogateescape keeps invalid UTF-8 (it happens in byte-level vocabularies) round-trippable
        return raw.decode("utf-8", errors="surrogateescape")

    def string_array(self, count: int, what: str) -> list[str] | SkippedStrings | RawStrings:
        # the hot path of every header (vocabularies of 100k+ tokens and merges): one tight loop, bytes slices
        buf, pos, end = self.buf, self.pos, len(self.buf)
        decode = self.decode_strings is True
        unpack = _U64.unpack_from
        out: list[str] = []
        append = out.append
        for _ in range(count):
            if pos + 8 > end:
                raise CorruptFile(f"{self.path.name}: truncated GGUF header (reading {what} at byte {pos})")
            (n,) = unpack(buf, pos)
            pos += 8
            if n > end - pos:
                raise CorruptFile(f"{self.path.name}: truncated GGUF header (reading {what} at byte {pos})")
            if decode:
                append(buf[pos : pos + n].decode("utf-8", errors="surrogateescape"))
            pos += n
        start, self.pos = self.pos, pos
        if self.decode_strings == "raw":
            return RawStrings(count, bytes(buf[start:pos]))
        return out if decode else SkippedStrings(count)

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        try:
            vt = GGUFValueType(vtype)
        except ValueError:
            raise CorruptFile(f"{self.path.name}: unknown GGUF value type {vtype} in {what}") from None
        if vt == GGUFValueType.STRING:
            return self.string(what)
        if vt == GGUFValueType.ARRAY:
            if depth >= MAX_NESTING:
                raise CorruptFile(f"{self.path.name}: arrays nested too deeply in {what}")
            sub = self.unpack("<I", what)
            count = self.unpack("<Q", what)
            try:
                svt = GGUFValueType(sub)
            except ValueError:
                raise CorruptFile(f"{self.path.name}: unknown GGUF array type {sub} in {what}") from None
            # every element takes at least one byte (a string at least 8): bound count before allocating
            min_size = (
                8
                if svt in (GGUFValueType.STRING, GGUFValueType.ARRAY)
                else struct.calcsize(SCALAR_FORMATS[svt])
            )
            if count * min_size > len(self.buf) - self.pos:
                raise CorruptFile(f"{self.path.name}: array of {count} elements in {what} exceeds the file")
            if svt == GGUFValueType.STRING:
                return self.string_array(count, what)
            if svt in NUMPY_SCALARS:
                dt = np.dtype(NUMPY_SCALARS[svt])
                arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos)
                self.pos += count * dt.itemsize
                return arr.tolist()
            return [self.value(sub, what, depth + 1) for _ in range(count)]
        return self.unpack(SCALAR_FORMATS[vt], what)


class GGUFFile:
    """The parsed header of one GGUF file."""

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
        with open(path, "rb") as f:
            self._parse(f)

    def _parse(self, f) -> None:
        path = self.path
        if f.read(4) != GGUF_MAGIC:
            raise CorruptFile(f"{path.name}: not a GGUF file (bad magic)")
        # Read the header region lazily in growing windows: most headers are a few MB even with big vocabularies.
        window = min(self.size, 1 << 24)
        while True:
            f.seek(0)
            buf = f.read(window)
            try:
                self._parse_header(_Cursor(buf, path, self.decode_strings))
                return
            except CorruptFile:
                if window >= self.size:
                    raise
                window = min(self.size, window * 4)

    def _parse_header(self, cur: _Cursor) -> None:
        path = self.path
        cur.pos = 4
        self.version = cur.unpack("<I", "version")
        if self.version not in (2, 3):
            raise CorruptFile(f"{path.name}: unsupported GGUF version {self.version}")
        n_tensors = cur.unpack("<Q", "tensor count")
        n_kv = cur.unpack("<Q", "metadata count")
        # each KV takes at least 8+4 bytes, each tensor info at least 8+4+8+4+8
        if n_kv * 12 > self.size or n_tensors * 32 > self.size:
            raise CorruptFile(
                f"{path.name}: header declares {n_tensors} tensors and {n_kv} keys, more than a {self.size}-byte "
                "file can hold (truncated or corrupt)"
            )
        self.kv: dict[str, Any] = {}
        self.kv_types: dict[str, tuple[GGUFValueType, GGUFValueType | None]] = {}
        for i in range(n_kv):
            key = cur.string(f"key #{i}")
            vtype = cur.unpack("<I", f"type of {key}")
            sub = None
            if vtype == GGUFValueType.ARRAY and cur.pos + 4 <= len(cur.buf):
                sub = struct.unpack_from("<I", cur.buf, cur.pos)[0]
            if key in self.kv:
                raise CorruptFile(f"{path.name}: duplicate key {key}")
            self.kv[key] = cur.value(vtype, key)
            self.kv_types[key] = (GGUFValueType(vtype), GGUFValueType(sub) if sub is not None else None)
        alignment = self.kv.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
        if (
            not isinstance(alignment, int)
            or alignment <= 0
            or alignment & (alignment - 1)
            or alignment > 1 << 20
        ):
            raise CorruptFile(f"{path.name}: invalid general.alignment {alignment!r}")
        self.alignment = alignment
        raw_infos = []
        for i in range(n_tensors):
            name = cur.string(f"tensor name #{i}")
            n_dims = cur.unpack("<I", f"dims of {name}")
            if not 1 <= n_dims <= GGML_MAX_DIMS:
                raise CorruptFile(f"{path.name}: tensor {name} has {n_dims} dimensions")
            dims = [cur.unpack("<Q", f"dims of {name}") for _ in range(n_dims)]
            type_id = cur.unpack("<I", f"type of {name}")
            offset = cur.unpack("<Q", f"offset of {name}")
            raw_infos.append((name, dims, type_id, offset))
        self.data_start = _align(cur.pos, alignment)
        data_size = self.size - self.data_start
        if data_size < 0:
            raise CorruptFile(f"{path.name}: truncated before the tensor data")
        self.tensors: dict[str, TensorInfo] = {}
        for name, dims, type_id, offset in raw_infos:
            info = self._tensor_info(name, dims, type_id, offset, data_size)
            if name in self.tensors:
                raise CorruptFile(f"{path.name}: duplicate tensor {name}")
            self.tensors[name] = info
        check_no_overlap(self.tensors.values(), path.name)

    def _tensor_info(
        self, name: str, dims: list[int], type_id: int, offset: int, data_size: int
    ) -> TensorInfo:
        path = self.path
        tname = GGML_TYPE_BY_ID.get(type_id)
        if tname is None:
            raise CorruptFile(f"{path.name}: tensor {name} has unknown ggml type {type_id}")
        _, blk, bsize = GGML_TYPES[tname]
        numel = 1
        for d in dims:
            if d > 1 << 40:
                raise CorruptFile(f"{path.name}: tensor {name} has an absurd dimension {d}")
            numel *= d
        if dims[0] % blk:
            raise CorruptFile(
                f"{path.name}: tensor {name} row of {dims[0]} is not a multiple of {tname} blocks"
            )
        nbytes = numel // blk * bsize
        if offset % self.alignment:
            raise CorruptFile(f"{path.name}: tensor {name} data offset {offset} is not aligned")
        if offset + nbytes > data_size:
            raise CorruptFile(f"{path.name}: tensor {name} data lies past the end of the file (truncated?)")
        shape = tuple(int(d) for d in reversed(dims))  # GGUF stores ne[0] (the row length) first
        return TensorInfo(name, tname, shape, nbytes, str(path), self.data_start + offset)


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
