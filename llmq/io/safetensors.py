"""Safetensors reading and streaming writing: single files and sharded Hugging Face directories.

The header parser is llmq's own (no torch, no safetensors import) and treats input as untrusted: the header length
is bounded, every tensor's byte range must match its dtype and shape and lie inside the file, ranges may not
overlap, and shard names in an index may not leave the model directory. The safetensors package has no
streaming writer, so the writer computes every offset up front, writes the header, then appends tensors.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llmq.errors import BadInput, CorruptFile, UnsafeCheckpoint
from llmq.io import limits
from llmq.io.base import ELEMENT_SIZES, TensorInfo, check_no_overlap, fsync_close, group_by_size, write_tensor
from llmq.io.ggml_types import NUMPY_DTYPES
from llmq.io.paths import check_inside, check_model_dir
from llmq.io.readat import ReadAt, file_read_at
from llmq.io.rows import FileTensorReader, read_rows

INDEX_NAME = "model.safetensors.index.json"
from llmq.io import PICKLE_SUFFIXES  # noqa: E402 - one definition for both places


class _BigInt(str):
    """An integer literal longer than any size can be: kept as text so the field check names it."""


_LONG_INT = re.compile(rf"\d{{{limits.SAFETENSORS_MAX_INT_DIGITS + 1}}}")


def _parse_int(text: str) -> int | _BigInt:
    if len(text) - text.startswith("-") > limits.SAFETENSORS_MAX_INT_DIGITS:
        return _BigInt(text)
    return int(text)


def _json_depth(raw: bytes) -> int:
    """Deepest nesting of objects and arrays outside strings, in C-speed passes over 1 MiB chunks.

    Exact for valid JSON (escaped backslashes and quotes are removed first, so every remaining quote delimits a
    string); for invalid JSON exact up to the first error, which is as far as a JSON parser gets.
    """
    if b"\\" in raw:
        raw = raw.replace(b"\\\\", b"")
    if b"\\" in raw:
        raw = raw.replace(b'\\"', b"")
    arr = np.frombuffer(raw, dtype=np.uint8)
    parity = depth = deepest = 0
    for i in range(0, arr.size, 1 << 20):
        c = arr[i : i + (1 << 20)]
        quotes = c == 34
        outside = ((np.cumsum(quotes, dtype=np.int32) + parity) & 1) == 0
        step = ((c == 123) | (c == 91)).astype(np.int8) - ((c == 125) | (c == 93)).astype(np.int8)
        levels = np.cumsum(step * outside, dtype=np.int64) + depth
        deepest = max(deepest, int(levels.max()))
        depth = int(levels[-1])
        parity = (parity + int(quotes.sum())) & 1
    return deepest


_WS = re.compile(r"[ \t\n\r]*")
_DECODE = json.JSONDecoder().raw_decode
# integers past 20 digits (the JSON module refuses over 4,300) are kept as text, refused by the field check
_DECODE_LONG = json.JSONDecoder(parse_int=_parse_int).raw_decode


def _members(text: str, name: str) -> Iterator[tuple[str, Any]]:
    """(key, value) of the top-level JSON object, decoded one member at a time."""
    decode = _DECODE_LONG if _LONG_INT.search(text) else _DECODE
    ws = _WS.match
    pos = ws(text).end()
    if text[pos : pos + 1] != "{":
        raise CorruptFile(f"{name}: header is not a JSON object")
    pos = ws(text, pos + 1).end()
    if text[pos : pos + 1] == "}":
        pos += 1
    else:
        while True:
            if text[pos : pos + 1] != '"':
                raise json.JSONDecodeError("Expecting property name enclosed in double quotes", text, pos)
            key, pos = decode(text, pos)
            pos = ws(text, pos).end()
            if text[pos : pos + 1] != ":":
                raise json.JSONDecodeError("Expecting ':' delimiter", text, pos)
            value, pos = decode(text, ws(text, pos + 1).end())
            yield key, value
            pos = ws(text, pos).end()
            c = text[pos : pos + 1]
            pos = ws(text, pos + 1).end()
            if c == "}":
                break
            if c != ",":
                raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)
    if ws(text, pos).end() != len(text):
        raise json.JSONDecodeError("Extra data", text, pos)


def parse_safetensors_header(read_at: ReadAt, name: str, size: int | None = None,
                             file: str | None = None) -> tuple[dict[str, TensorInfo], dict[str, str]]:  # fmt: skip
    """Tensor infos (absolute offsets) and ``__metadata__`` of one safetensors file, through ``read_at``.

    ``name`` labels errors; ``size`` (when known) checks the data against the end of the file; ``file`` goes
    into each TensorInfo (default: ``name``). Bounded by llmq.io.limits before the JSON is parsed: header
    bytes, object count (tensors), commas (list items), nesting depth; integers longer than 20 digits and
    wrong types are refused naming the tensor and the field.
    """
    head = read_at(0, 8)
    if len(head) < 8:
        raise CorruptFile(f"{name}: too small to be a safetensors file")
    (n,) = struct.unpack("<Q", head)
    cap = limits.SAFETENSORS_MAX_HEADER_BYTES
    if n > cap:
        raise CorruptFile(f"{name}: header length {n} exceeds the {cap >> 20} MiB limit")
    if size is not None and n > size - 8:
        raise CorruptFile(f"{name}: header length {n} is past the end of the file")
    raw = read_at(8, n)
    if len(raw) < n:
        raise CorruptFile(f"{name}: truncated header ({len(raw)} of {n} bytes)")
    if raw.count(b"{") > limits.MAX_TENSORS + 2:
        raise CorruptFile(f"{name}: header holds more than {limits.MAX_TENSORS} tensors")
    if raw.count(b",") > limits.SAFETENSORS_MAX_JSON_VALUES:
        raise CorruptFile(f"{name}: header holds more than {limits.SAFETENSORS_MAX_JSON_VALUES} values")
    if _json_depth(raw) > limits.SAFETENSORS_MAX_JSON_DEPTH:
        raise CorruptFile(f"{name}: header nests deeper than {limits.SAFETENSORS_MAX_JSON_DEPTH} levels")
    try:
        text = raw.decode("utf-8")  # strictly: json.loads(bytes) would also take UTF-16 and UTF-32
    except UnicodeDecodeError as e:
        raise CorruptFile(f"{name}: header is not UTF-8 (invalid byte at {e.start})") from None
    del raw
    data_start = 8 + n
    data_len = None if size is None else size - data_start
    file = name if file is None else file
    meta: Any = {}
    infos: dict[str, TensorInfo] = {}
    try:
        # one top-level member at a time: the header's JSON is never held whole beside the infos built from it
        for tname, entry in _members(text, name):
            if tname == "__metadata__":
                meta = entry if entry is not None else {}
                if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
                    raise CorruptFile(f"{name}: __metadata__ must map strings to strings")
                if len(meta) > limits.MAX_METADATA_KEYS:
                    raise CorruptFile(f"{name}: __metadata__ holds more than {limits.MAX_METADATA_KEYS} keys")
                continue
            if tname in infos:
                raise CorruptFile(f"{name}: duplicate tensor {tname}")
            if len(infos) == limits.MAX_TENSORS:
                raise CorruptFile(f"{name}: header holds more than {limits.MAX_TENSORS} tensors")
            infos[tname] = _entry_info(name, file, tname, entry, data_start, data_len)
    except json.JSONDecodeError as e:
        raise CorruptFile(f"{name}: header is not valid JSON ({e.msg} at character {e.pos})") from None
    except RecursionError:  # cannot happen below the depth cap; kept as a one-line error all the same
        raise CorruptFile(f"{name}: header nests too deeply") from None
    check_no_overlap(infos.values(), name)
    return infos, meta


def parse_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Tensor infos (absolute offsets) and ``__metadata__`` of one local .safetensors file."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise BadInput(f"no such file: {path}") from None
    return parse_safetensors_header(file_read_at(path), path.name, size, file=str(path))


_DTYPES = {d: d for d in ELEMENT_SIZES}  # one string object per dtype, not one per tensor


def _entry_info(
    name: str, file: str, tname: str, entry: Any, data_start: int, data_len: int | None
) -> TensorInfo:
    # the hot loop of a header with 100k tensors: plain type checks, no generators
    if (
        len(tname) > limits.MAX_NAME_BYTES // 4
        and len(tname.encode("utf-8", "surrogatepass")) > limits.MAX_NAME_BYTES
    ):
        raise CorruptFile(
            f"{name}: tensor name {tname[:40]!r}... exceeds the {limits.MAX_NAME_BYTES}-byte limit"
        )
    if type(entry) is not dict:
        raise CorruptFile(f"{name}: entry for {tname} is not an object")
    dtype = entry.get("dtype")
    shape = entry.get("shape")
    offs = entry.get("data_offsets")
    size = ELEMENT_SIZES.get(dtype) if type(dtype) is str else None
    if size is None:
        raise CorruptFile(f"{name}: tensor {tname} has unknown dtype {_short(dtype)}")
    numel = 1
    if type(shape) is not list:
        raise CorruptFile(f"{name}: tensor {tname} has an invalid shape {_short(shape)}")
    for d in shape:
        if type(d) is not int or not 0 <= d <= limits.MAX_DIM:  # not bool, not a _BigInt
            raise CorruptFile(f"{name}: tensor {tname} has an invalid shape {_short(shape)}")
        numel *= d
    if type(offs) is not list or len(offs) != 2:
        raise CorruptFile(f"{name}: tensor {tname} has invalid data_offsets {_short(offs)}")
    start, end = offs
    if type(start) is not int or type(end) is not int or not 0 <= start <= end:
        raise CorruptFile(f"{name}: tensor {tname} has invalid data_offsets {_short(offs)}")
    nbytes = numel * size
    if end - start != nbytes:
        raise CorruptFile(f"{name}: tensor {tname} spans {end - start} bytes, its shape needs {nbytes}")
    if data_len is not None and end > data_len:
        raise CorruptFile(f"{name}: tensor {tname} data lies past the end of the file (truncated?)")
    return TensorInfo(tname, _DTYPES[dtype], tuple(shape), nbytes, file, data_start + start)


def _short(v: Any) -> str:
    """A bounded repr for error lines (a hostile value may be megabytes long)."""
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def to_torch(arr: np.ndarray, dtype: str):
    import torch

    from llmq.io.base import torch_dtype

    if dtype == "BF16":
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    if dtype in ("F8_E4M3", "F8_E5M2"):
        return torch.from_numpy(arr.view(np.uint8)).view(torch_dtype(dtype))
    return torch.from_numpy(arr)


def _shard_files(directory: Path) -> tuple[list[Path], dict[str, str] | None]:
    index = directory / INDEX_NAME
    if index.exists():
        try:
            data = json.loads(index.read_text())
            weight_map = data["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            raise CorruptFile(f"{index}: not a valid safetensors index") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CorruptFile(f"{index}: weight_map must map tensor names to file names")
        files: list[Path] = []
        for shard in dict.fromkeys(weight_map.values()):
            # checked lexically: shards are often symlinks (the Hugging Face cache points them into blobs/)
            parts = Path(shard).parts
            if not parts or os.path.isabs(shard) or ".." in parts or "\\" in shard:
                raise CorruptFile(f"{index}: shard path {shard!r} leaves the model directory")
            p = directory / shard
            if not p.exists():
                raise BadInput(f"{index}: shard {shard} is missing")
            check_inside(p, directory)  # a shard directory may be a link out
            files.append(p)
        return files, weight_map
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise BadInput(f"{directory}: no .safetensors files in this directory")
    return files, None


class SafetensorsReader(FileTensorReader):
    """Reader over one .safetensors file or a Hugging Face model directory (sharded or not)."""

    kind = "safetensors"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.config: dict[str, Any] | None = None
        if self.path.is_dir():
            pickles = [p.name for p in self.path.iterdir() if p.suffix in PICKLE_SUFFIXES]
            has_st = any(self.path.glob("*.safetensors"))
            if pickles and not has_st:
                raise UnsafeCheckpoint(
                    f"{self.path} holds only pickle checkpoints ({pickles[0]}); pickle can run code on load. "
                    "Convert it to safetensors, or pass --allow-pickle if you trust it"
                )
            check_model_dir(self.path)
            files, weight_map = _shard_files(self.path)
            cfg = self.path / "config.json"
            if cfg.exists():
                try:
                    self.config = json.loads(cfg.read_text())
                except (json.JSONDecodeError, UnicodeDecodeError):
                    raise CorruptFile(f"{cfg}: not valid JSON") from None
                if not isinstance(self.config, dict):
                    raise CorruptFile(f"{cfg}: not a JSON object")
        else:
            if self.path.suffix in PICKLE_SUFFIXES:
                raise UnsafeCheckpoint(
                    f"{self.path.name} is a pickle checkpoint; pickle can run code on load. Convert it to "
                    "safetensors, or pass --allow-pickle if you trust it"
                )
            files, weight_map = [self.path], None
        self.files = files
        self._infos: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        for f in files:
            infos, meta = parse_header(f)
            if not self.metadata:
                self.metadata = dict(meta)
            for name, info in infos.items():
                if name in self._infos:
                    raise CorruptFile(
                        f"{f.name}: tensor {name} also appears in {Path(self._infos[name].file).name}"
                    )
                self._infos[name] = info
        if weight_map is not None:
            for name, shard in weight_map.items():
                info = self._infos.get(name)
                if info is None or Path(info.file).name != Path(shard).name:
                    raise CorruptFile(f"{INDEX_NAME}: {name} is not in {shard}")

    def read(self, name: str, dequantize: bool = True):
        info = self.info(name)
        return to_torch(read_rows(info), info.dtype)


class SafetensorsWriter:
    """Streams tensors into ``directory`` as model.safetensors or model-0000i-of-0000N.safetensors + index.

    ``plan`` fixes shards and offsets and writes every header; ``write`` appends one tensor (numpy array or torch
    tensor) in planned order; ``close`` fsyncs and writes the index. Atomicity is the caller's job (write into
    an ``AtomicOutput`` directory).
    """

    def __init__(self, directory: str | os.PathLike, max_shard_bytes: int | None = None,
                 metadata: Mapping[str, str] | None = None, base_name: str = "model"):  # fmt: skip
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self.base_name = base_name
        self._order: list[TensorInfo] = []
        self._file_of: dict[str, int] = {}
        self._files: list[Path] = []
        self._fh = None
        self._cur = -1
        self._next = 0
        self.total_size = 0

    def plan(self, infos: Sequence[TensorInfo], metadata: Mapping[str, Any] | None = None) -> None:
        if self._order:
            raise RuntimeError("plan() called twice")
        seen = set()
        for t in infos:
            if t.dtype not in ELEMENT_SIZES:
                raise BadInput(f"tensor {t.name}: {t.dtype} cannot be stored in safetensors")
            if t.name in seen:
                raise BadInput(f"tensor {t.name} planned twice")
            seen.add(t.name)
        groups = group_by_size(infos, self.max_shard_bytes)
        n = len(groups)
        if n == 1:
            self._files = [self.directory / f"{self.base_name}.safetensors"]
        else:
            self._files = [
                self.directory / f"{self.base_name}-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)
            ]
        self._groups = groups
        self._order = [t for g in groups for t in g]
        self._file_of = {t.name: i for i, g in enumerate(groups) for t in g}
        self.total_size = sum(t.nbytes for t in self._order)

    def _open(self, idx: int) -> None:
        if self._fh is not None:
            self._finish()
        header: dict[str, Any] = {"__metadata__": dict(self.metadata)}
        off = 0
        for t in self._groups[idx]:
            header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [off, off + t.nbytes]}
            off += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, as the safetensors package does
        self._fh = open(self._files[idx], "wb")
        self._fh.write(struct.pack("<Q", len(raw)) + raw)
        self._cur = idx

    def write(self, name: str, data) -> None:
        if self._next >= len(self._order):
            raise RuntimeError(f"write({name}) after every planned tensor was written")
        expected = self._order[self._next]
        if expected.name != name:
            raise RuntimeError(
                f"tensors must be written in planned order: expected {expected.name}, got {name}"
            )
        while self._cur != self._file_of[name]:
            self._open(self._cur + 1)
        assert self._fh is not None
        write_tensor(self._fh, name, data, expected.nbytes)
        self._next += 1

    def _finish(self) -> None:
        assert self._fh is not None
        fsync_close(self._fh)
        self._fh = None

    def close(self) -> list[Path]:
        if self._next != len(self._order):
            raise RuntimeError(f"{len(self._order) - self._next} planned tensors were never written")
        while self._cur + 1 < len(self._files):  # an empty plan still writes one valid file
            self._open(self._cur + 1)
        if self._fh is not None:
            self._finish()
        if len(self._files) > 1:
            index = {
                "metadata": {"total_size": self.total_size},
                "weight_map": {t.name: self._files[self._file_of[t.name]].name for t in self._order},
            }
            (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return list(self._files)

    def abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _numpy_code(dt: np.dtype) -> str:
    for code, s in NUMPY_DTYPES.items():
        if code not in ("BF16", "F8_E4M3", "F8_E5M2") and np.dtype(s) == dt:
            return code
    raise BadInput(f"numpy dtype {dt} cannot be stored in safetensors")


def save_file(
    tensors: Mapping[str, Any], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Write a small dict of tensors to one .safetensors file (tests, fixtures, small outputs)."""
    from llmq.io.base import dtype_code

    path = Path(path)
    infos = []
    for name, t in tensors.items():
        if isinstance(t, np.ndarray):
            infos.append(TensorInfo(name, _numpy_code(t.dtype), tuple(t.shape), t.nbytes))
        else:
            infos.append(TensorInfo(name, dtype_code(t.dtype), tuple(t.shape), t.numel() * t.element_size()))
    w = SafetensorsWriter(path.parent, metadata=metadata, base_name=path.name.removesuffix(".safetensors"))
    w.plan(infos)
    for name, t in tensors.items():
        w.write(name, t)
    w.close()
