"""llama.cpp importance matrices: both file formats, llama-quantize's normalization, computing one."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from llmq.errors import BadInput, CalibrationError, CorruptFile
from llmq.quant.gguf.imatrix import Imatrix, compute_imatrix, gguf_name, load_imatrix, save_imatrix


def _sample() -> Imatrix:
    rng = np.random.default_rng(0)
    im = Imatrix(datasets=["calib.txt"], chunk_count=4, chunk_size=512)
    im.sums["blk.0.attn_q.weight"] = (rng.random((1, 64)) * 100).astype(np.float32)
    im.counts["blk.0.attn_q.weight"] = np.array([2048])
    im.sums["blk.0.ffn_down_exps.weight"] = (rng.random((2, 32)) * 100).astype(np.float32)
    im.counts["blk.0.ffn_down_exps.weight"] = np.array([1000, 0])  # an expert that saw no token
    return im


def test_gguf_roundtrip_and_normalization(tmp_path) -> None:
    im = _sample()
    back = load_imatrix(save_imatrix(im, tmp_path / "im.gguf"))
    assert not back.is_legacy and back.datasets == ["calib.txt"] and back.chunk_count == 4
    w = back.weights()
    np.testing.assert_array_equal(
        w["blk.0.attn_q.weight"], im.sums["blk.0.attn_q.weight"][0] / np.float32(2048)
    )
    exps = w["blk.0.ffn_down_exps.weight"].reshape(2, 32)
    np.testing.assert_array_equal(exps[1], np.ones(32, np.float32))  # quantize.cpp uses 1 for unseen experts


def test_legacy_roundtrip(tmp_path) -> None:
    im = _sample()
    del im.sums["blk.0.ffn_down_exps.weight"], im.counts["blk.0.ffn_down_exps.weight"]
    back = load_imatrix(save_imatrix(im, tmp_path / "im.dat"))
    assert back.is_legacy and back.datasets == ["calib.txt"] and back.chunk_count == 4
    ncall = np.float32(4)  # ceil(2048 tokens / 512)
    want = (im.sums["blk.0.attn_q.weight"][0] / np.float32(2048)) * ncall / ncall
    np.testing.assert_allclose(back.weights()["blk.0.attn_q.weight"], want, rtol=1e-6)


def test_corrupt_files(tmp_path) -> None:
    p = tmp_path / "bad.dat"
    p.write_bytes(struct.pack("<i", 3) + struct.pack("<i", 10_000_000))
    with pytest.raises(CorruptFile):
        load_imatrix(p)
    p.write_bytes(struct.pack("<i", -1))
    with pytest.raises(CorruptFile):
        load_imatrix(p)
    p.write_bytes(b"GGUF" + b"\x00" * 8)
    with pytest.raises(CorruptFile):
        load_imatrix(p)
    with pytest.raises(BadInput):
        load_imatrix(tmp_path / "missing.dat")


def test_names() -> None:
    assert gguf_name("model.layers.12.self_attn.v_proj") == "blk.12.attn_v.weight"
    assert gguf_name("model.layers.0.mlp.down_proj") == "blk.0.ffn_down.weight"
    assert gguf_name("lm_head") == "output.weight"
    assert gguf_name("model.embed_tokens") is None


def test_compute_matches_manual_sums() -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    chunks = [torch.randint(0, 64, (1, 16)) for _ in range(3)]
    captured: list[torch.Tensor] = []
    h = model.model.layers[1].mlp.down_proj.register_forward_hook(
        lambda m, i, o: captured.append(i[0].detach())
    )
    im = compute_imatrix(model, iter(chunks), dataset="rand", chunk_size=16)
    h.remove()
    assert "output.weight" not in im.sums and len(im.sums) == 14
    x = torch.cat([c.reshape(-1, c.shape[-1]) for c in captured]).double()
    np.testing.assert_allclose(im.sums["blk.1.ffn_down.weight"][0], (x * x).sum(0).numpy(), rtol=1e-5)
    assert int(im.counts["blk.1.ffn_down.weight"][0]) == 48
    with pytest.raises(CalibrationError):
        compute_imatrix(model, iter([]))
