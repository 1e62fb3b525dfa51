"""RTN quantization: the grid, bit widths, layer selection, the quantizer's end-to-end run."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmq.errors import BadInput, OutputExists, ShapeError
from llmq.formats.packing import pack_int32, unpack_int32
from llmq.quant.base import quantizers
from llmq.quant.layerwise.rtn import RTNConfig, RTNQuantizer


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 8), rows=st.integers(1, 4), n=st.integers(1, 80), dim=st.sampled_from([0, 1]))
def test_pack_int32_round_trip(bits, rows, n, dim):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 2**bits, (rows, n), generator=g)
    if dim == 0:
        codes = codes.t().contiguous()
    packed = pack_int32(codes, bits, dim=dim)
    assert packed.dtype == torch.int32 and packed.shape[dim] == (n * bits + 31) // 32
    assert torch.equal(unpack_int32(packed, bits, n, dim=dim), codes.to(torch.int32))


def test_config_validation_and_options():
    # (registered at import; quantizers.get() would also import every other built-in method module)
    assert quantizers._items["rtn"] is RTNQuantizer
    c = RTNConfig.from_options("rtn", {"bits": 8, "group_size": -1, "ignore": ("x",)})
    assert RTNConfig.from_dict(c.to_dict()) == c
    with pytest.raises(BadInput, match="--bits"):
        RTNConfig(bits=7)
    with pytest.raises(BadInput, match="rtn writes"):
        RTNConfig(format="bnb")
    with pytest.raises(BadInput, match="--damp-percent"):
        RTNConfig.from_options("rtn", {"damp_percent": 0.1})


def test_rtn_run_end_to_end(tiny_llama, tmp_path):
    out = tmp_path / "q"
    cfg = RTNConfig(format="gptq", bits=4, group_size=64, sym=False)
    planned = RTNQuantizer().plan(tiny_llama, cfg)
    res = RTNQuantizer().run(tiny_llama, out, cfg)
    assert res.output == out and res.output_bytes < res.input_bytes / 3
    assert {t.name for t in planned} == {t.name for t in res.tensors}
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["bits"] == 4 and config["quantization_config"]["sym"] is False
    with pytest.raises(OutputExists):
        RTNQuantizer().run(tiny_llama, out, cfg)
    RTNQuantizer().run(tiny_llama, out, RTNConfig(format="gptq", bits=8, group_size=-1), force=True)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 8


def test_rtn_indivisible_layers(tiny_llama_odd, tmp_path):
    # hidden 320 is not a multiple of 192 (ffn 576 is): an error naming the layer, or skipped on request
    with pytest.raises(ShapeError, match="_proj: in_features 320 is not divisible"):
        RTNQuantizer().run(tiny_llama_odd, tmp_path / "a", RTNConfig(group_size=192))
    assert not (tmp_path / "a").exists()
    res = RTNQuantizer().run(tiny_llama_odd, tmp_path / "b", RTNConfig(group_size=192, skip_indivisible=True))
    qcfg = json.loads((tmp_path / "b" / "config.json").read_text())["quantization_config"]
    assert "model.layers.0.self_attn.q_proj" in qcfg["ignore"]
    assert not any("down_proj" in i for i in qcfg["ignore"])
    assert any("q_proj" in n for n in res.notes)
