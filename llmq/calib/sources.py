"""Calibration and evaluation text: named datasets, local files and the offline ``pydocs`` corpus.

A *spec* names where text comes from:

- a registered source name: ``wikitext2``, ``c4``, ``pile-val``, ``ptb``, ``pydocs`` (or one a user added with
  ``sources.add(name, source)`` / the ``llmq.calib_sources`` entry-point group), optionally pinned to a hub
  revision with ``name@REVISION``;
- a local file: ``.txt``, ``.jsonl`` / ``.json`` (a ``text`` field), ``.json.gz`` / ``.jsonl.gz``, ``.parquet``,
  ``.jsonl.zst`` (needs ``zstandard``). ``path.jsonl:field`` picks another field.

Named datasets are fetched through huggingface-hub, so its cache, ``HF_HUB_CACHE`` / ``HF_HOME`` and
``HF_HUB_OFFLINE=1`` apply; the environment is read at call time, not at import.

``load_text`` returns the text of one split as one string (what perplexity evaluates); ``documents`` returns the
separate documents (what calibration samples from). WikiText-2 is read exactly as llama.cpp's
``get-wikitext-2.sh`` file: the raw file (from ``$LLMQ_SHARED/data`` when present) or, from the hub, the parquet
rows laid back into that file's lines - never rows joined with "\\n\\n", which is a different text.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol, runtime_checkable

from llmq.errors import BadInput, CalibrationError, require
from llmq.registry import Registry

__all__ = [
    "TextSource",
    "HubSource",
    "FileSource",
    "PydocsSource",
    "sources",
    "resolve_source",
    "load_text",
    "load_documents",
    "local_data_dir",
]


@runtime_checkable
class TextSource(Protocol):
    """What a calibration/evaluation source provides. Register your own with ``sources.add(name, obj)``."""

    name: str
    # the split calibration uses when none is given (evaluation uses "test")
    calibration_split: str

    def documents(self, split: str) -> list[str]: ...

    def text(self, split: str) -> str: ...


sources: Registry[TextSource] = Registry("calibration source", entry_point_group="llmq.calib_sources")


def local_data_dir() -> Path | None:
    """``$LLMQ_SHARED`` (a folder holding ``data/wikitext-2-raw/``), or None: the library never guesses a path."""
    env = os.environ.get("LLMQ_SHARED")
    return Path(env) if env else None


# ---------------------------------------------------------------------------------------------------- readers


def _rows_from_json_lines(lines: Iterable[str], text_field: str, origin: str) -> list[str]:
    rows = []
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise CalibrationError(f"{origin}: line {n} is not JSON ({e.msg})") from None
        rows.append(_field(obj, text_field, origin))
    return rows


def _field(obj: object, text_field: str, origin: str) -> str:
    if isinstance(obj, str):
        return obj
    if not isinstance(obj, Mapping) or not isinstance(obj.get(text_field), str):
        raise CalibrationError(f"{origin}: records have no string field {text_field!r}")
    return obj[text_field]


def _read_json_text(raw: str, text_field: str, origin: str) -> list[str]:
    """A JSON array of records/strings, or JSON lines."""
    head = raw.lstrip()[:1]
    if head == "[":
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise CalibrationError(f"{origin}: not valid JSON ({e.msg})") from None
        return [_field(o, text_field, origin) for o in data]
    return _rows_from_json_lines(raw.splitlines(), text_field, origin)


def _read_parquet(path: Path, text_field: str, origin: str) -> list[str]:
    pq = require("pyarrow.parquet", "data")
    try:
        table = pq.read_table(path, columns=[text_field])
    except (KeyError, ValueError, OSError) as e:
        # pyarrow says "No match for FieldRef" for a missing column
        raise CalibrationError(f"{origin}: cannot read column {text_field!r} ({e})") from None
    return [s if s is not None else "" for s in table.column(text_field).to_pylist()]


def read_rows(path: Path, text_field: str = "text") -> list[str]:
    """Rows (documents) of a local data file, by its suffix."""
    origin = str(path)
    name = path.name.lower()
    if not path.is_file():
        raise BadInput(f"calibration file {path} does not exist")
    if name.endswith(".parquet"):
        return _read_parquet(path, text_field, origin)
    if name.endswith((".json.gz", ".jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return _read_json_text(f.read(), text_field, origin)
    if name.endswith(".jsonl.zst"):
        zstd = require("zstandard", "data")
        with open(path, "rb") as fb:
            reader = io.TextIOWrapper(zstd.ZstdDecompressor().stream_reader(fb), encoding="utf-8")
            return _rows_from_json_lines(reader, text_field, origin)
    if name.endswith((".jsonl", ".json")):
        return _read_json_text(path.read_text(encoding="utf-8"), text_field, origin)
    if name.endswith((".txt", ".raw", ".md", ".text")):
        # newline="" keeps the file byte-exact (CRLF stays CRLF): evaluation text must be the file as it is
        with open(path, encoding="utf-8", newline="") as f:
            return [f.read()]
    raise BadInput(f"unsupported calibration file type {path.name} (.txt, .jsonl, .json.gz, .parquet)")


# ---------------------------------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class FileSource:
    """A local file: a ``.txt`` is one document; record files give one document per record."""

    path: Path
    text_field: str = "text"
    name: str = "file"
    calibration_split: str = "file"

    def documents(self, split: str) -> list[str]:
        return read_rows(self.path, self.text_field)

    def text(self, split: str) -> str:
        rows = self.documents(split)
        return rows[0] if len(rows) == 1 else "\n\n".join(rows)


@dataclass(frozen=True)
class PydocsSource:
    """CPython's own documentation topics (``pydoc_data.topics``): offline on every machine, ~465k characters."""

    name: str = "pydocs"
    calibration_split: str = "train"

    def documents(self, split: str) -> list[str]:
        try:
            from pydoc_data.topics import topics
        except ImportError as e:  # pragma: no cover - some distributions strip pydoc_data
            raise CalibrationError(f"pydoc_data is not available in this Python ({e})") from None
        # sorted keys: the corpus must not depend on dict order across Python builds
        return [topics[k] for k in sorted(topics)]

    def text(self, split: str) -> str:
        return "\n\n".join(self.documents(split))


def _hub_env() -> tuple[bool, str | None]:
    """HF_HUB_OFFLINE and the cache directory, read now (huggingface_hub reads them once at import)."""
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    cache = os.environ.get("HF_HUB_CACHE")
    if not cache and os.environ.get("HF_HOME"):
        cache = str(Path(os.environ["HF_HOME"]) / "hub")
    return offline, cache


def hub_file(repo_id: str, filename: str, revision: str) -> Path:
    """One file of a dataset repository through huggingface-hub (cache first; offline honoured)."""
    hub = require("huggingface_hub", "data")
    offline, cache = _hub_env()
    try:
        return Path(
            hub.hf_hub_download(
                repo_id,
                filename,
                repo_type="dataset",
                revision=revision,
                cache_dir=cache,
                local_files_only=offline,
            )
        )
    # huggingface_hub raises many types (offline, 404, connection, auth); to the user all mean "not here"
    except Exception as e:
        how = "it is not in the hub cache and HF_HUB_OFFLINE is set" if offline else str(e).splitlines()[0]
        raise CalibrationError(
            f"cannot get {filename} of dataset {repo_id}@{revision}: {how} "
            "(use --calibration pydocs or a local .txt/.jsonl/.parquet file)"
        ) from None


@dataclass(frozen=True)
class HubSource:
    """A dataset repository on the Hugging Face Hub: one file per split, rows read from ``text_field``."""

    name: str
    repo_id: str
    files: Mapping[str, str]
    text_field: str = "text"
    revision: str = "main"
    calibration_split: str = "train"
    joiner: str = "\n\n"
    # split -> local file used instead of the hub when it exists (e.g. the shared wikitext-2 test file)
    local: Mapping[str, Callable[[], Path]] = field(default_factory=dict)

    def _path(self, split: str) -> Path:
        if split not in self.files:
            raise BadInput(f"{self.name} has no split {split!r} (has: {', '.join(self.files)})")
        return hub_file(self.repo_id, self.files[split], self.revision)

    def rows(self, split: str) -> list[str]:
        return read_rows(self._path(split), self.text_field)

    def documents(self, split: str) -> list[str]:
        return [r for r in self.rows(split) if r.strip()]

    def text(self, split: str) -> str:
        return self.joiner.join(self.documents(split))

    def at_revision(self, revision: str) -> HubSource:
        return replace(self, revision=revision)


@dataclass(frozen=True)
class WikiText2Source(HubSource):
    """WikiText-2 raw: the text is the original ``wiki.*.raw`` file, byte for byte.

    The hub's parquet has one row per line of that file with the line's "\\n" kept, and the blank " \\n"
    separator lines stored as empty rows; putting those back gives the raw file again.
    """

    def _local(self, split: str) -> Path | None:
        root = local_data_dir()
        p = root / "data" / "wikitext-2-raw" / f"wiki.{split}.raw" if root is not None else None
        return p if p is not None and p.is_file() else None

    def text(self, split: str) -> str:
        local = self._local(split)
        if local is not None:
            with open(local, encoding="utf-8", newline="") as f:
                return f.read()
        return "".join(row if row else " \n" for row in self.rows(split))

    def documents(self, split: str) -> list[str]:
        # articles start at a " = Title = " heading line; calibration samples windows inside articles
        docs: list[str] = []
        current: list[str] = []
        for line in self.text(split).splitlines(keepends=True):
            if line.startswith(" = ") and not line.startswith(" = = ") and current:
                docs.append("".join(current))
                current = []
            current.append(line)
        if current:
            docs.append("".join(current))
        return [d for d in docs if d.strip()]


def _register_builtins() -> None:
    sources.add(
        "wikitext2",
        WikiText2Source(
            name="wikitext2",
            repo_id="Salesforce/wikitext",
            files={
                s: f"wikitext-2-raw-v1/{s}-00000-of-00001.parquet" for s in ("train", "validation", "test")
            },
        ),
    )
    sources.register("wikitext-2")(sources.get("wikitext2"))
    # GPTQ's c4 calibration: the first English validation shard of allenai/c4 (json.gz, "text" field)
    c4_val = "en/c4-validation.00000-of-00008.json.gz"
    sources.add(
        "c4",
        HubSource(
            name="c4",
            repo_id="allenai/c4",
            files={"validation": c4_val, "test": c4_val, "train": "en/c4-train.00000-of-01024.json.gz"},
            calibration_split="validation",
        ),
    )
    # AutoAWQ's default calibration set
    pile = "val.jsonl.zst"
    sources.add(
        "pile-val",
        HubSource(
            name="pile-val",
            repo_id="mit-han-lab/pile-val-backup",
            files={"validation": pile, "test": pile, "train": pile},
            calibration_split="validation",
        ),
    )
    sources.register("pile")(sources.get("pile-val"))
    # Penn Treebank (text only): one sentence per row, joined by newlines as the original ptb.*.txt files are
    sources.add(
        "ptb",
        HubSource(
            name="ptb",
            repo_id="ptb-text-only/ptb_text_only",
            files={s: f"penn_treebank/{s}-00000-of-00001.parquet" for s in ("train", "validation", "test")},
            text_field="sentence",
            joiner="\n",
        ),
    )
    sources.add("pydocs", PydocsSource())


_register_builtins()


def resolve_source(spec: str) -> TextSource:
    """A spec (registered name, ``name@revision``, or a file path with optional ``:field``) to a source."""
    if not spec or not spec.strip():
        raise BadInput("empty calibration/evaluation source")
    name, _, revision = spec.partition("@")
    if name.lower() in sources and "/" not in name:
        src = sources.get(name)
        if revision:
            if not isinstance(src, HubSource):
                raise BadInput(f"{name} is not a hub dataset; it has no revision to pin")
            src = src.at_revision(revision)
        return src
    path, text_field = _split_field(spec)
    if not path.exists():
        known = ", ".join(sources.names())
        raise BadInput(f"{spec!r} is neither a known dataset ({known}) nor an existing file")
    return FileSource(path=path, text_field=text_field, name=path.name)


def _split_field(spec: str) -> tuple[Path, str]:
    """``data.jsonl:content`` -> (data.jsonl, "content"); a bare path keeps the "text" field."""
    p = Path(spec)
    if not p.exists() and ":" in spec:
        head, _, tail = spec.rpartition(":")
        if tail and "/" not in tail and Path(head).exists():
            return Path(head), tail
    return p, "text"


def load_text(spec: str, split: str = "test") -> str:
    """The whole text of a split as one string (perplexity evaluates this)."""
    text = resolve_source(spec).text(split)
    if not text.strip():
        raise CalibrationError(f"{spec} ({split}) has no text")
    return text


def load_documents(spec: str, split: str | None = None) -> list[str]:
    """The non-empty documents of a split (``None``: the source's calibration split)."""
    src = resolve_source(spec)
    docs = [d for d in src.documents(split or src.calibration_split) if d.strip()]
    if not docs:
        raise CalibrationError(f"{spec} has no text")
    return docs


def registered(names: Sequence[str] | None = None) -> dict[str, TextSource]:
    """Name -> source for the given names (all when None); for listings in the CLI and docs."""
    return {n: sources.get(n) for n in (names or sources.names())}
