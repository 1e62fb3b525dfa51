"""Checkpoint formats: reference unpackers written from the public layouts, complete output directories,
and the real consumers (transformers + compressed-tensors / bitsandbytes) on CPU."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llmq.errors import BadInput, OutputExists, ShapeError, UnsupportedType
from llmq.formats import detect_format, get_format
from llmq.formats.base import LayerSpec, Scheme
from llmq.formats.writer import write_checkpoint
from llmq.io import open_checkpoint
from llmq.quant.grid import quantize_rtn
from llmq.quant.layerwise.rtn import RTNConfig, RTNQuantizer
from llmq.quant.select import select_layers

# ------------------------------------------------------------------ reference unpackers (from the specs, slow)


def _u32(t: torch.Tensor) -> np.ndarray:
    return t.numpy().astype(np.int64) & 0xFFFFFFFF


def ref_bitstream(words: np.ndarray, bits: int, n: int) -> list[int]:
    """A run of int32 words read as one little-endian bit string, ``n`` fields of ``bits`` bits."""
    big = 0
    for i, w in enumerate(words.tolist()):
        big |= int(w) << (32 * i)
    return [(big >> (bits * k)) & ((1 << bits) - 1) for k in range(n)]


def ref_gptq(t: dict[str, torch.Tensor], name: str, bits: int):
    """GPTQ v1: qweight [in*bits/32, out] packed along in; qzeros [G, out*bits/32] hold zero-1; scales [G, out]."""
    qw, qz = _u32(t[f"{name}.qweight"]), _u32(t[f"{name}.qzeros"])
    scales, g_idx = t[f"{name}.scales"].float(), t[f"{name}.g_idx"].long()
    out, inp = scales.shape[1], g_idx.shape[0]
    codes = np.array([ref_bitstream(qw[:, o], bits, inp) for o in range(out)])  # [out, in]
    zeros = np.array([ref_bitstream(qz[g], bits, out) for g in range(qz.shape[0])]) + 1  # [G, out]
    W = scales.T[:, g_idx] * (torch.from_numpy(codes).float() - torch.from_numpy(zeros).float().T[:, g_idx])
    return codes, zeros.T, W


def ref_awq(t: dict[str, torch.Tensor], name: str, group_size: int):
    """AWQ GEMM: nibble k of word w holds column 8w + [0,2,4,6,1,3,5,7][k]; zeros as they are."""
    order = [0, 2, 4, 6, 1, 3, 5, 7]

    def unpack(words: np.ndarray) -> np.ndarray:
        rows, nw = words.shape
        out = np.zeros((rows, nw * 8), dtype=np.int64)
        for w in range(nw):
            for k in range(8):
                out[:, 8 * w + order[k]] = (words[:, w] >> (4 * k)) & 0xF
        return out

    codes = unpack(_u32(t[f"{name}.qweight"])).T  # [out, in]
    zeros = unpack(_u32(t[f"{name}.qzeros"])).T  # [out, G]
    scales = t[f"{name}.scales"].float().T
    g = torch.arange(codes.shape[1]) // group_size
    W = scales[:, g] * (torch.from_numpy(codes).float() - torch.from_numpy(zeros).float()[:, g])
    return codes, zeros, W


def ref_ct(t: dict[str, torch.Tensor], name: str, bits: int, sym: bool):
    """compressed-tensors pack-quantized: [out, in*bits/32] dense along in, signed values + 2^(bits-1)."""
    out, inp = t[f"{name}.weight_shape"].tolist()
    wp = _u32(t[f"{name}.weight_packed"])
    half = 1 << (bits - 1)
    signed = np.array([ref_bitstream(wp[o], bits, inp) for o in range(out)]) - half
    scale = t[f"{name}.weight_scale"].float()
    if sym:
        zp = np.zeros(scale.shape, dtype=np.int64)
    else:
        zw = _u32(t[f"{name}.weight_zero_point"])
        zp = np.array([ref_bitstream(zw[:, g], bits, out) for g in range(scale.shape[1])]).T - half
    gs = inp // scale.shape[1]
    g = torch.arange(inp) // gs
    W = scale[:, g] * (torch.from_numpy(signed).float() - torch.from_numpy(zp).float()[:, g])
    return signed + half, zp + half, W


# ------------------------------------------------------------------ packing round trips


def _layer(bits, gs, sym, out=64, inp=128, fmt=None, seed=0):
    torch.manual_seed(seed)
    W = torch.randn(out, inp) * 0.05
    return W, quantize_rtn(W, bits, gs, sym, get_format(fmt).min_zero if fmt else 0)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_gptq_pack_matches_reference(bits, sym):
    fmt = get_format("gptq")
    W, q = _layer(bits, 32, sym, fmt="gptq")
    scheme = Scheme(method="rtn", bits=bits, group_size=32, sym=sym)
    t = fmt.pack("L", q, scheme)
    assert [(i.name, i.dtype, i.shape) for i in fmt.plan(scheme, LayerSpec("L", 64, 128))] == [
        (k, {torch.int32: "I32", torch.float16: "F16"}[v.dtype], tuple(v.shape)) for k, v in t.items()
    ]
    codes, zeros, Wref = ref_gptq(t, "L", bits)
    assert np.array_equal(codes, q.qweight.numpy()) and np.array_equal(zeros, q.zeros.numpy())
    assert torch.allclose(Wref, q.dequantize(), atol=2e-3 * float(q.scales.max()) / 0.01)
    back = fmt.unpack("L", t.__getitem__, fmt.config(scheme, []))
    assert torch.equal(back.qweight.long(), q.qweight.long()) and torch.equal(
        back.zeros.long(), q.zeros.long()
    )


def test_gptq_v1_refuses_zero_point_zero():
    q = quantize_rtn(torch.rand(8, 64), 4, 32, False)  # all-positive groups -> zero 0
    with pytest.raises(ShapeError, match="zero-1"):
        get_format("gptq").pack("L", q, Scheme(method="rtn", bits=4, group_size=32, sym=False))


@pytest.mark.parametrize("sym", [True, False])
def test_awq_pack_matches_reference(sym):
    fmt = get_format("awq")
    W, q = _layer(4, 32, sym)
    scheme = Scheme(method="rtn", bits=4, group_size=32, sym=sym)
    t = fmt.pack("L", q, scheme)
    assert (
        t["L.qweight"].shape == (128, 8) and t["L.qzeros"].shape == (4, 8) and t["L.scales"].shape == (4, 64)
    )
    codes, zeros, Wref = ref_awq(t, "L", 32)
    assert np.array_equal(codes, q.qweight.numpy()) and np.array_equal(zeros, q.zeros.numpy())
    assert torch.allclose(Wref, q.dequantize(), atol=1e-3)
    back = fmt.unpack("L", t.__getitem__, fmt.config(scheme, []))
    assert torch.equal(back.dequantize(), q.dequantize().half().float()) or torch.allclose(
        back.dequantize(), q.dequantize(), atol=1e-3
    )


@pytest.mark.parametrize("bits", [4, 8, 3])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("gs", [32, -1])
def test_compressed_tensors_pack_matches_reference_and_package(bits, sym, gs):
    fmt = get_format("compressed-tensors")
    W, q = _layer(bits, gs, sym)
    scheme = Scheme(method="rtn", bits=bits, group_size=gs, sym=sym, dtype="F32")
    t = fmt.pack("L", q, scheme)
    codes, zeros, Wref = ref_ct(t, "L", bits, sym)
    assert np.array_equal(codes, q.qweight.numpy())
    assert torch.allclose(Wref, q.dequantize(), atol=1e-6)
    # the compressed-tensors package itself is the oracle for its own layout
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    cfg = fmt.config(scheme, [])["config_groups"]["group_0"]
    qs = QuantizationScheme(targets=["Linear"], weights=cfg["weights"])
    state = {k.removeprefix("L."): v for k, v in t.items()}
    dec = PackedQuantizationCompressor.decompress(state, qs)
    assert torch.allclose(dec["weight"].float(), q.dequantize(), atol=1e-6)


def test_format_limits():
    scheme8 = Scheme(method="rtn", bits=8, group_size=128)
    with pytest.raises(UnsupportedType):
        get_format("awq").check(scheme8, LayerSpec("L", 64, 128))
    with pytest.raises(UnsupportedType, match="group size"):
        get_format("awq").check(Scheme(method="rtn", bits=4, group_size=-1), LayerSpec("L", 64, 128))
    with pytest.raises(ShapeError):
        get_format("gptq").check(Scheme(method="rtn", bits=4, group_size=128), LayerSpec("L", 64, 96))
    with pytest.raises(BadInput, match="unknown checkpoint format"):
        get_format("exl2")
    assert detect_format({"quant_method": "bitsandbytes"}) == "bnb" and detect_format(None) is None


# ------------------------------------------------------------------ complete output directories


def test_output_dir_is_complete(tiny_llama, tmp_path):
    out = tmp_path / "gptq"
    RTNQuantizer().run(tiny_llama, out, RTNConfig(format="gptq", bits=4, group_size=64))
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "quantize_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
    } <= names
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["checkpoint_format"] == "gptq" and qc["group_size"] == 64
    assert json.loads((out / "quantize_config.json").read_text()) == qc
    card = (out / "README.md").read_text()
    for word in ("rtn", "gptq", "| bits | 4 |", "| group size | 64 |", "llmq version"):
        assert word in card
    with open_checkpoint(out) as r:
        names = set(r.names())
    assert (
        "model.layers.0.mlp.down_proj.qweight" in names and "model.layers.0.mlp.down_proj.weight" not in names
    )
    assert "model.embed_tokens.weight" in names and "lm_head.weight" in names  # unquantized by default


def test_failed_write_leaves_nothing(tiny_llama, tmp_path):
    fmt = get_format("compressed-tensors")
    with open_checkpoint(tiny_llama) as r:
        layers = select_layers(r.infos())
        scheme = Scheme(method="rtn", bits=4, group_size=64)

        def broken():
            yield layers[0].name, quantize_rtn(r.read(layers[0].name + ".weight"), 4, 64)
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError):
            write_checkpoint(tmp_path / "x", fmt, r, layers, broken(), scheme)
        assert list(tmp_path.iterdir()) == []
        with pytest.raises(BadInput, match="out of order"):
            write_checkpoint(tmp_path / "y", fmt, r, layers, iter([(layers[1].name, None)]), scheme)
        (tmp_path / "z").mkdir()
        with pytest.raises(OutputExists):
            write_checkpoint(tmp_path / "z", fmt, r, layers, iter([]), scheme)


# ------------------------------------------------------------------ real consumers on CPU


def test_transformers_loads_compressed_tensors(tiny_llama, tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    from llmq.models.load import load_causal_lm

    out = tmp_path / "ct"
    RTNQuantizer().run(
        tiny_llama, out, RTNConfig(format="compressed-tensors", bits=4, group_size=64, sym=True)
    )
    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(0))
    ref = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        a = ref(ids).logits
        b = load_causal_lm(out)(ids).logits
    assert torch.allclose(a, b, atol=1e-4)


def test_formats_and_loader_never_import_quant():
    """Layering: formats (and the loader built on them) sit below the methods; the methods import formats."""
    import ast
    from pathlib import Path

    import llmq

    root = Path(llmq.__file__).parent
    for path in [*sorted((root / "formats").glob("*.py")), root / "models" / "load.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            mods = []
            if isinstance(node, ast.ImportFrom) and node.module:
                mods = [node.module]
            elif isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            assert not any(m == "llmq.quant" or m.startswith("llmq.quant.") for m in mods), (path.name, mods)
