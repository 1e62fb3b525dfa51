"""Read what the estimator needs about a model — config and tensor headers — never the weights.

MODEL may be a hub repo id (``owner/name``, optionally ``owner/name:file.gguf``), a local HF directory, a
``.safetensors`` file, a ``.gguf`` file or a bare ``config.json``. Hub files are read with HTTP range requests
through huggingface_hub (honouring ``HF_ENDPOINT``, ``HF_HUB_OFFLINE`` and the hub cache): config.json is
downloaded (it is small and cached), safetensors headers are the first ``8 + header_len`` bytes of each shard and
GGUF headers are read chunk by chunk up to the start of the tensor data.

Local files go through llmq's IO layer (``llmq.io.open_checkpoint``); hub files need their own range-reading
parsers, here. Imports no torch.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmq.errors import BadInput, CorruptFile
from llmq.io.base import ELEMENT_SIZES, TensorInfo

# Bounds on lengths read from untrusted headers, checked before anything is allocated.
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
MAX_GGUF_STRING = 64 * 1024 * 1024
MAX_GGUF_ITEMS = 1 << 28
MAX_GGUF_HEADER = 512 * 1024 * 1024
# Non-string arrays at most this long are kept as lists (per-layer head counts, SWA patterns...); longer ones
# and string arrays (the vocabulary) are kept only as their length.
KEEP_ARRAY_ITEMS = 65536

ReadAt = Callable[[int, int], bytes]  # (offset, size) -> bytes, shorter only at end of file


@dataclass(frozen=True)
class GGUFArrayLen:
    """Stand-in for a long or string GGUF array: only its element type and length are kept."""

    item_type: int
    count: int

    def __len__(self) -> int:
        return self.count


@dataclass
class ModelSource:
    """Everything the estimator reads about a model."""

    spec: str
    kind: str  # "hub" | "dir" | "safetensors" | "gguf" | "config"
    config: dict[str, Any] | None = None  # HF config.json
    gguf_metadata: dict[str, Any] | None = None
    tensors: list[TensorInfo] = field(default_factory=list)
    gguf_data_span: int | None = None  # bytes from the first tensor's start to the last tensor's end
    files: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- header parsing


def parse_safetensors_header(read_at: ReadAt, file_name: str) -> tuple[list[TensorInfo], dict[str, Any]]:
    head = read_at(0, 8)
    if len(head) != 8:
        raise CorruptFile(f"{file_name}: shorter than a safetensors header")
    (n,) = struct.unpack("<Q", head)
    if n == 0 or n > MAX_SAFETENSORS_HEADER:
        raise CorruptFile(f"{file_name}: safetensors header length {n} out of bounds")
    raw = read_at(8, n)
    if len(raw) != n:
        raise CorruptFile(f"{file_name}: safetensors header truncated")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFile(f"{file_name}: safetensors header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CorruptFile(f"{file_name}: safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    infos = []
    for name, entry in header.items():
        try:
            dtype, shape = entry["dtype"], tuple(int(d) for d in entry["shape"])
            start, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CorruptFile(f"{file_name}: bad header entry for {name!r}") from None
        if dtype not in ELEMENT_SIZES:
            raise CorruptFile(f"{file_name}: unknown dtype {dtype!r} for {name!r}")
        numel = 1
        for d in shape:
            numel *= d
        if end - start != numel * ELEMENT_SIZES[dtype] or start < 0:
            raise CorruptFile(
                f"{file_name}: {name!r} occupies {end - start} bytes, its shape needs a different size"
            )
        infos.append(TensorInfo(name, dtype, shape, end - start, file=file_name, offset=8 + n + start))
    return infos, meta


class _Cursor:
    """Sequential reader over a ReadAt that fetches growing chunks (few round trips for remote files)."""

    def __init__(self, read_at: ReadAt, file_name: str, chunk: int = 1 << 20):
        self.read_at, self.file_name, self.chunk = read_at, file_name, chunk
        self.buf, self.buf_start, self.pos = b"", 0, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > MAX_GGUF_HEADER:
            raise CorruptFile(f"{self.file_name}: GGUF header larger than {MAX_GGUF_HEADER} bytes")
        end = self.pos + n
        if end > self.buf_start + len(self.buf):
            # keep the unread tail, fetch at least one chunk more (chunks double: headers of big vocabularies)
            tail = self.buf[self.pos - self.buf_start :]
            want = max(n - len(tail), self.chunk)
            more = self.read_at(self.buf_start + len(self.buf), want)
            self.buf, self.buf_start = tail + more, self.pos
            self.chunk = min(self.chunk * 2, 64 << 20)
            if end > self.buf_start + len(self.buf):
                raise CorruptFile(f"{self.file_name}: GGUF header truncated")
        out = self.buf[self.pos - self.buf_start : end - self.buf_start]
        self.pos = end
        return out

    def unpack(self, fmt: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))[0]

    def string(self) -> str:
        n = self.unpack("Q")
        if n > MAX_GGUF_STRING:
            raise CorruptFile(f"{self.file_name}: GGUF string length {n} out of bounds")
        return self.take(n).decode("utf-8", errors="replace")


_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def _gguf_value(cur: _Cursor, vtype: int) -> Any:
    if vtype in _GGUF_SCALARS:
        return cur.unpack(_GGUF_SCALARS[vtype])
    if vtype == 8:
        return cur.string()
    if vtype == 9:
        item_type, count = cur.unpack("I"), cur.unpack("Q")
        if count > MAX_GGUF_ITEMS:
            raise CorruptFile(f"{cur.file_name}: GGUF array length {count} out of bounds")
        if item_type in _GGUF_SCALARS:
            fmt = _GGUF_SCALARS[item_type]
            raw = cur.take(count * struct.calcsize(fmt))
            if count > KEEP_ARRAY_ITEMS:
                return GGUFArrayLen(item_type, count)
            return list(struct.unpack(f"<{count}{fmt}", raw))
        if item_type == 8:
            for _ in range(count):  # the vocabulary: skipped, only its length matters here
                n = cur.unpack("Q")
                if n > MAX_GGUF_STRING:
                    raise CorruptFile(f"{cur.file_name}: GGUF string length {n} out of bounds")
                cur.take(n)
            return GGUFArrayLen(item_type, count)
        raise CorruptFile(f"{cur.file_name}: GGUF array of unsupported type {item_type}")
    raise CorruptFile(f"{cur.file_name}: unknown GGUF value type {vtype}")


def parse_gguf_header(read_at: ReadAt, file_name: str) -> tuple[list[TensorInfo], dict[str, Any], int]:
    """Parse a GGUF header; returns (tensors in torch order with absolute offsets, metadata, data span bytes)."""
    from llmq.io.ggml_types import GGML_TYPE_BY_ID, GGML_TYPES

    cur = _Cursor(read_at, file_name, chunk=256 * 1024)
    if cur.take(4) != b"GGUF":
        raise CorruptFile(f"{file_name}: not a GGUF file (bad magic)")
    version = cur.unpack("I")
    if version not in (2, 3):
        raise CorruptFile(f"{file_name}: unsupported GGUF version {version}")
    n_tensors, n_kv = cur.unpack("Q"), cur.unpack("Q")
    if n_tensors > 1 << 24 or n_kv > 1 << 20:
        raise CorruptFile(f"{file_name}: GGUF counts out of bounds ({n_tensors} tensors, {n_kv} keys)")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        meta[key] = _gguf_value(cur, cur.unpack("I"))
    raw = []
    for _ in range(n_tensors):
        name, n_dims = cur.string(), cur.unpack("I")
        if n_dims > 8:
            raise CorruptFile(f"{file_name}: tensor {name!r} has {n_dims} dims")
        dims = [cur.unpack("Q") for _ in range(n_dims)]
        raw.append((name, dims, cur.unpack("I"), cur.unpack("Q")))
    alignment = int(meta.get("general.alignment", 32))
    if alignment <= 0 or alignment & (alignment - 1):
        raise CorruptFile(f"{file_name}: general.alignment {alignment} is not a power of two")
    data_start = -(-cur.pos // alignment) * alignment
    infos = []
    for name, dims, ttype, off in raw:
        if ttype not in GGML_TYPE_BY_ID:
            raise CorruptFile(f"{file_name}: tensor {name!r} has unknown ggml type {ttype}")
        type_name = GGML_TYPE_BY_ID[ttype]
        _, block, type_size = GGML_TYPES[type_name]
        if not dims or dims[0] % block:
            raise CorruptFile(f"{file_name}: tensor {name!r} row of {dims[:1]} is not a multiple of {block}")
        numel = 1
        for d in dims:
            numel *= d
        nbytes = numel // block * type_size
        infos.append(TensorInfo(name, type_name, tuple(reversed(dims)), nbytes, file=file_name,
                                offset=data_start + off))  # fmt: skip
    span = max((t.offset + t.nbytes for t in infos), default=data_start) - min(
        (t.offset for t in infos), default=data_start
    )
    return infos, meta, span


# --------------------------------------------------------------------------------------------- local inputs


def _local_read_at(path: Path) -> ReadAt:
    def read_at(offset: int, size: int) -> bytes:
        with open(path, "rb") as fh:
            fh.seek(offset)
            return fh.read(size)

    return read_at


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFile(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CorruptFile(f"{path}: expected a JSON object")
    return data


def _shard_names(index: dict[str, Any], where: str) -> list[str]:
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CorruptFile(f"{where}: model.safetensors.index.json has no weight_map")
    names = sorted(set(weight_map.values()))
    for n in names:
        if not isinstance(n, str) or n.startswith(("/", "\\")) or ".." in Path(n).parts:
            raise CorruptFile(f"{where}: shard name {n!r} leaves the model directory")
    return names


def _gguf_span(infos: list[TensorInfo]) -> int:
    """Σ over files of (last tensor end − first tensor start): what llama.cpp maps as its model buffer."""
    per_file: dict[str | None, tuple[int, int]] = {}
    for t in infos:
        lo, hi = per_file.get(t.file, (1 << 62, 0))
        per_file[t.file] = (min(lo, t.offset or 0), max(hi, (t.offset or 0) + t.nbytes))
    return sum(hi - lo for lo, hi in per_file.values())


def load_local(path: Path, spec: str) -> ModelSource:
    """Local checkpoints through llmq's IO layer (header parsing only); a bare config.json directly."""
    if path.is_file() and path.suffix == ".json":
        return ModelSource(spec, "config", config=_read_json(path))
    if path.is_dir() and not any(path.glob("*.safetensors")) and any(path.glob("*.gguf")):
        path = sorted(path.glob("*.gguf"))[0]
    if path.is_dir() and not any(path.glob("*.safetensors")):
        if (path / "config.json").is_file():
            return ModelSource(spec, "config", config=_read_json(path / "config.json"))
        raise BadInput(f"{spec}: no config.json, safetensors or GGUF file in the directory")
    from llmq.io import open_checkpoint

    with open_checkpoint(path, header_only=True) as reader:
        infos = list(reader.infos())
        if reader.kind == "gguf":
            return ModelSource(spec, "gguf", gguf_metadata=dict(reader.metadata), tensors=infos,
                               gguf_data_span=_gguf_span(infos), files=sorted({str(t.file) for t in infos}))  # fmt: skip
        config = reader.config
    if config is None and path.is_file() and path.with_name("config.json").is_file():
        config = _read_json(path.with_name("config.json"))
    return ModelSource(spec, "dir" if path.is_dir() else "safetensors", config=config, tensors=infos,
                       files=sorted({str(t.file) for t in infos}))  # fmt: skip


# --------------------------------------------------------------------------------------------- hub inputs

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w./-]+\.gguf)?(@[\w./-]+)?$")


def looks_like_hub_id(spec: str) -> bool:
    return bool(_HUB_ID.match(spec)) and not Path(spec).exists()


class _Hub:
    """Range reads of files in one hub repo; cached files are read locally, nothing is downloaded but config."""

    def __init__(self, repo_id: str, revision: str | None):
        import huggingface_hub

        self.hf = huggingface_hub
        self.repo_id, self.revision = repo_id, revision
        # read at call time (not import time) so that tests and users can point HF_ENDPOINT at a mirror
        self.endpoint = os.environ.get("HF_ENDPOINT") or huggingface_hub.constants.ENDPOINT
        self.offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE") or bool(
            huggingface_hub.constants.HF_HUB_OFFLINE
        )

    def cached(self, filename: str) -> Path | None:
        hit = self.hf.try_to_load_from_cache(self.repo_id, filename, revision=self.revision)
        return Path(hit) if isinstance(hit, str) else None

    def json_file(self, filename: str) -> dict[str, Any] | None:
        """A small JSON file through the hub cache; None when the repo does not have it."""
        from huggingface_hub.errors import (
            EntryNotFoundError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
        )

        try:
            local = self.hf.hf_hub_download(self.repo_id, filename, revision=self.revision, endpoint=self.endpoint,
                                            local_files_only=self.offline)  # fmt: skip
        except EntryNotFoundError:
            return None
        except LocalEntryNotFoundError:
            if self.offline:
                return None
            raise BadInput(f"{self.repo_id}: cannot reach the hub for {filename}") from None
        except RepositoryNotFoundError:
            raise BadInput(f"{self.repo_id}: no such repository on {self.endpoint}") from None
        except Exception as exc:  # httpx/OS errors: one clear line, never a traceback
            raise BadInput(
                f"{self.repo_id}: fetching {filename} failed ({type(exc).__name__}: {exc})"
            ) from None
        return _read_json(Path(local))

    def read_at(self, filename: str) -> ReadAt:
        local = self.cached(filename)
        if local is not None:
            return _local_read_at(local)
        if self.offline:
            raise BadInput(f"{self.repo_id}/{filename} is not in the hub cache and HF_HUB_OFFLINE is set")
        url = self.hf.hf_hub_url(self.repo_id, filename, revision=self.revision, endpoint=self.endpoint)
        headers = self.hf.utils.build_hf_headers()
        session = self.hf.get_session()

        def read_at(offset: int, size: int) -> bytes:
            rng = {"Range": f"bytes={offset}-{offset + size - 1}"}
            try:
                resp = session.get(url, headers={**headers, **rng}, follow_redirects=True)
            except Exception as exc:
                raise BadInput(f"{self.repo_id}/{filename}: range request failed ({exc})") from None
            if resp.status_code == 416:
                return b""
            if resp.status_code == 200:  # server ignored Range: take the slice, but never keep more
                return resp.content[offset : offset + size]
            if resp.status_code != 206:
                raise BadInput(f"{self.repo_id}/{filename}: HTTP {resp.status_code} on a range request")
            return resp.content[:size]

        return read_at

    def list_files(self) -> list[str]:
        if self.offline:
            raise BadInput(
                f"{self.repo_id}: name the GGUF file (owner/name:file.gguf) when HF_HUB_OFFLINE is set"
            )
        try:
            return list(
                self.hf.HfApi(endpoint=self.endpoint).list_repo_files(self.repo_id, revision=self.revision)
            )
        except Exception as exc:
            raise BadInput(
                f"{self.repo_id}: listing the repository failed ({type(exc).__name__}: {exc})"
            ) from None


def load_hub(spec: str) -> ModelSource:
    repo, _, revision = spec.partition("@")
    repo, _, gguf_name = repo.partition(":")
    hub = _Hub(repo, revision or None)
    src = ModelSource(spec, "hub")
    if not gguf_name:
        src.config = hub.json_file("config.json")
        index = hub.json_file("model.safetensors.index.json")
        if index is not None:
            shards = _shard_names(index, spec)
        elif src.config is not None:
            shards = ["model.safetensors"]
        else:
            ggufs = sorted(f for f in hub.list_files() if f.endswith(".gguf"))
            if not ggufs:
                raise BadInput(f"{spec}: no config.json, safetensors or GGUF file in the repository")
            gguf_name = ggufs[0]
            shards = []
        for shard in shards:
            infos, _ = parse_safetensors_header(hub.read_at(shard), f"{repo}/{shard}")
            src.tensors.extend(infos)
            src.files.append(f"{repo}/{shard}")
    if gguf_name:
        infos, meta, span = parse_gguf_header(hub.read_at(gguf_name), f"{repo}/{gguf_name}")
        src.tensors, src.gguf_metadata, src.gguf_data_span = infos, meta, span
        src.files = [f"{repo}/{gguf_name}"]
    return src


def load_model(spec: str) -> ModelSource:
    """Resolve MODEL (hub id, directory, .safetensors, .gguf, config.json) to its config and tensor headers."""
    path = Path(spec).expanduser()
    if spec.lower() == "smollm2" and not path.exists():
        from llmq.io.hub import packaged_model

        path = packaged_model()
    if path.exists():
        return load_local(path, spec)
    if looks_like_hub_id(spec):
        return load_hub(spec)
    raise BadInput(f"{spec}: no such file or directory, and not a hub repo id")
