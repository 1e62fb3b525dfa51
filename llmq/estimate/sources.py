"""Read what the estimator needs about a model — config and tensor headers — never the weights.

MODEL may be a hub repo id (``owner/name``, optionally ``owner/name:file.gguf``), a local HF directory, a
``.safetensors`` file, a ``.gguf`` file or a bare ``config.json``. Hub files are read with HTTP range requests
through huggingface_hub (honouring ``HF_ENDPOINT``, ``HF_HUB_OFFLINE`` and the hub cache): config.json is
downloaded (it is small and cached), safetensors headers are the first ``8 + header_len`` bytes of each shard and
GGUF headers are read in fixed-size chunks up to the start of the tensor data.

Local files go through llmq's IO layer (``llmq.io.open_checkpoint``); hub files go through the same header
parsers (llmq.io.gguf, llmq.io.safetensors) over a range-request ``read_at``. Imports no torch.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmq.errors import BadInput, CorruptFile
from llmq.io.base import TensorInfo
from llmq.io.readat import ReadAt, file_read_at


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


# --------------------------------------------------------------------------------------------- local inputs


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
            return file_read_at(local)
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
    from llmq.io.gguf import parse_gguf_header
    from llmq.io.safetensors import parse_safetensors_header

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
            src.tensors.extend(infos.values())
            src.files.append(f"{repo}/{shard}")
    if gguf_name:
        header = parse_gguf_header(hub.read_at(gguf_name), f"{repo}/{gguf_name}", decode_strings=False)
        src.tensors = list(header.tensors.values())
        src.gguf_metadata, src.gguf_data_span = header.kv, _gguf_span(src.tensors)
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
