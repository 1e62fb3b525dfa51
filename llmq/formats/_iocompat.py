"""The few llmq.io entry points the formats use, in one place."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def open_source(path):
    """A checkpoint reader for ``path`` (llmq.io.open_checkpoint)."""
    from llmq.io import open_checkpoint

    return open_checkpoint(path)


def safetensors_writer(directory: Path, max_shard_bytes: int | None = None, metadata: dict | None = None):
    from llmq.io import SafetensorsWriter

    return SafetensorsWriter(directory, max_shard_bytes=max_shard_bytes, metadata=metadata)


def reader_config(reader) -> dict[str, Any] | None:
    """config.json of the reader's model directory (None for a bare file without one)."""
    cfg = getattr(reader, "config", None)
    if cfg is not None:
        return dict(cfg)
    p = Path(reader.path)
    f = (p if p.is_dir() else p.parent) / "config.json"
    return json.loads(f.read_text()) if f.is_file() else None
