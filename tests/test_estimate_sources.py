"""MODEL kinds of the estimator: local dir / .safetensors / .gguf / config.json, and hub ids over a local HTTP
server with range requests (never the weights)."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from llmq.errors import BadInput, CorruptFile
from llmq.estimate.memory import EstimateConfig, estimate_memory
from llmq.estimate.sources import load_model
from llmq.io.gguf import parse_gguf_header
from llmq.io.safetensors import parse_safetensors_header
from tests.estimate_hub_server import HubServer


def _total_header_bytes(d: Path) -> int:
    total = 0
    for f in d.glob("*.safetensors"):
        (n,) = struct.unpack("<Q", f.read_bytes()[:8])
        total += sum(v["data_offsets"][1] - v["data_offsets"][0]
                     for k, v in json.loads(f.read_bytes()[8 : 8 + n]).items() if k != "__metadata__")  # fmt: skip
    return total


def test_local_kinds_agree(tiny_llama: Path, tmp_path: Path) -> None:
    d = load_model(str(tiny_llama))
    assert d.kind == "dir" and d.config["model_type"] == "llama"
    assert sum(t.nbytes for t in d.tensors) == _total_header_bytes(tiny_llama)
    assert len(d.files) == len(list(tiny_llama.glob("*.safetensors"))) > 1  # sharded index followed
    cfg = load_model(str(tiny_llama / "config.json"))
    assert cfg.kind == "config" and not cfg.tensors
    one = sorted(tiny_llama.glob("*.safetensors"))[0]
    f = load_model(str(one))
    assert f.kind == "safetensors" and f.config is not None and 0 < len(f.tensors) < len(d.tensors)


def test_gguf_source(smollm2_gguf_path: Path) -> None:
    src = load_model(str(smollm2_gguf_path))
    assert src.kind == "gguf" and len(src.tensors) == 272
    assert src.gguf_metadata["llama.block_count"] == 30
    with open(smollm2_gguf_path, "rb") as fh:

        def read_at(off: int, n: int) -> bytes:
            fh.seek(off)
            return fh.read(n)

        header = parse_gguf_header(read_at, "smollm2", decode_strings=False)
    # the one header parser, over a read_at, agrees with the local reader on every tensor
    assert [(t.name, t.dtype, t.shape, t.nbytes, t.offset) for t in header.tensors.values()] == [
        (t.name, t.dtype, t.shape, t.nbytes, t.offset) for t in src.tensors
    ]
    assert header.kv["tokenizer.ggml.tokens"].count == 49152


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(BadInput):
        load_model(str(tmp_path / "nope"))
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(CorruptFile):
        load_model(str(bad))
    st = tmp_path / "x.safetensors"
    st.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(CorruptFile):
        parse_safetensors_header(lambda o, n: st.read_bytes()[o : o + n], "x")
    g = tmp_path / "x.gguf"
    g.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + struct.pack("<Q", 1 << 40))
    with pytest.raises(CorruptFile):
        parse_gguf_header(lambda o, n: g.read_bytes()[o : o + n], "x")
    with pytest.raises(BadInput):
        estimate_memory(EstimateConfig(str(tmp_path / "nope")))


@pytest.fixture
def hub_env(monkeypatch, tmp_path: Path):
    import huggingface_hub.constants as c

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))

    def start(repos: dict[str, Path]) -> HubServer:
        server = HubServer(repos).__enter__()
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        return server

    servers: list[HubServer] = []
    yield lambda repos: servers.append(start(repos)) or servers[-1]
    for s in servers:
        s.__exit__(None, None, None)


def test_hub_sharded_reads_headers_only(hub_env, tiny_llama: Path) -> None:
    server = hub_env({"org/tiny": tiny_llama})
    src = load_model("org/tiny")
    local = load_model(str(tiny_llama))
    assert src.kind == "hub" and src.config == local.config
    assert sorted((t.name, t.shape, t.nbytes) for t in src.tensors) == sorted(
        (t.name, t.shape, t.nbytes) for t in local.tensors
    )
    weights = sum(f.stat().st_size for f in tiny_llama.glob("*.safetensors"))
    # only config, index and the headers crossed the wire: far less than the weights
    assert server.bytes_sent < weights / 20
    ranged = [r for r in server.requests if r[0] == "GET" and r[1].endswith(".safetensors")]
    assert ranged and all(r[2] is not None for r in ranged)
    est = estimate_memory(EstimateConfig("org/tiny", engine="transformers"))
    assert est.results[0].weights_bytes == sum(t.nbytes for t in local.tensors)


def test_hub_gguf_by_listing(hub_env, smollm2_gguf_path: Path, tmp_path: Path) -> None:
    repo = tmp_path / "gguf-repo"
    repo.mkdir()
    (repo / "model.Q4_1.gguf").symlink_to(smollm2_gguf_path)
    server = hub_env({"org/smol-gguf": repo})
    src = load_model("org/smol-gguf")
    assert src.kind == "hub" and src.gguf_metadata["general.architecture"] == "llama"
    assert src.gguf_data_span == load_model(str(smollm2_gguf_path)).gguf_data_span
    assert server.bytes_sent < smollm2_gguf_path.stat().st_size / 10
    named = load_model("org/smol-gguf:model.Q4_1.gguf")
    assert len(named.tensors) == 272


def test_hub_offline_uses_cache_only(hub_env, monkeypatch, tiny_llama: Path) -> None:
    import huggingface_hub.constants as c

    hub_env({"org/tiny": tiny_llama})
    load_model("org/tiny")  # caches config.json and the index, not the shards
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(BadInput, match="HF_HUB_OFFLINE"):
        load_model("org/tiny")


def test_hub_missing_repo(hub_env, tiny_llama: Path) -> None:
    hub_env({"org/tiny": tiny_llama})
    with pytest.raises(BadInput):
        load_model("org/missing")


def test_sharded_index_escape_rejected(tiny_llama: Path, tmp_path: Path) -> None:
    d = tmp_path / "m"
    shutil.copytree(tiny_llama, d)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: "../evil.safetensors" for k in index["weight_map"]}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(BadInput):
        load_model(str(d))
