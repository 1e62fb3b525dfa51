"""Hub ids go through huggingface-hub's real cache code: tested offline against a cache laid out by hand."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmq.errors import BadInput
from llmq.io.hub import packaged_model, resolve_model

REPO = Path(__file__).resolve().parents[1]


def _fake_cache(
    cache: Path, repo_id: str, src: Path, revision: str = "0123456789abcdef0123456789abcdef01234567"
) -> Path:
    """The layout huggingface-hub writes: blobs/, snapshots/<rev>/<file> → ../../blobs/<hash>, refs/main."""
    root = cache / f"models--{repo_id.replace('/', '--')}"
    snap = root / "snapshots" / revision
    snap.mkdir(parents=True)
    (root / "blobs").mkdir()
    for i, f in enumerate(sorted(src.iterdir())):
        blob = root / "blobs" / f"{i:040x}"
        blob.write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(revision)
    return snap


def test_resolves_hub_id_from_cache_offline(tiny_llama, tmp_path, monkeypatch):
    snap = _fake_cache(tmp_path / "hub", "acme/tiny-llama", tiny_llama)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    assert resolve_model("acme/tiny-llama").resolve() == snap.resolve()
    with pytest.raises(BadInput, match="not in the Hugging Face cache"):
        resolve_model("acme/other-model")


def test_cli_converts_a_cached_hub_model(tiny_llama, tmp_path):
    _fake_cache(tmp_path / "hub", "acme/tiny-llama", tiny_llama)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "tiny.gguf"
    proc = subprocess.run([sys.executable, "-m", "llmq", "convert", "acme/tiny-llama", str(out), "-q"],
                          capture_output=True, text=True, env=env, cwd=REPO)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size > 0


def test_local_paths_and_default_model(tmp_path, smollm2_gguf_path):
    assert resolve_model(tmp_path) == tmp_path
    assert resolve_model("smollm2") == packaged_model() == smollm2_gguf_path
    with pytest.raises(BadInput, match="no such file"):
        resolve_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(BadInput, match="no such file"):
        resolve_model("./relative/thing")
