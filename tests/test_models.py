"""load_causal_lm: full-precision and every format llmq writes, unpacked once or on the fly, CPU and CUDA."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from llmq.errors import BadInput, CorruptFile
from llmq.models.load import QuantLinear, load_causal_lm
from llmq.quant.layerwise.nf4 import NF4Config, NF4Quantizer
from llmq.quant.layerwise.rtn import RTNConfig, RTNQuantizer

IDS = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def quantized(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("q")
    outs = {}
    for fmt in ("gptq", "awq", "compressed-tensors"):
        outs[fmt] = root / fmt
        RTNQuantizer().run(tiny_llama, outs[fmt], RTNConfig(format=fmt, bits=4, group_size=64, sym=False))
    outs["bnb"] = root / "bnb"
    NF4Quantizer().run(tiny_llama, outs["bnb"], NF4Config())
    return outs


def test_full_precision_matches_transformers(tiny_llama):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(ref(IDS).logits, load_causal_lm(tiny_llama)(IDS).logits)


def test_every_format_loads_and_formats_agree(tiny_llama, quantized):
    with torch.no_grad():
        base = load_causal_lm(tiny_llama)(IDS).logits
        logits = {}
        for fmt, path in quantized.items():
            m = load_causal_lm(path)
            assert isinstance(m.model.layers[1].self_attn.q_proj, QuantLinear)
            logits[fmt] = m(IDS).logits
            lazy = load_causal_lm(path, unpack_once=False)
            assert lazy.model.layers[0].mlp.up_proj.weight is None  # keeps codes, dequantizes per forward
            assert torch.allclose(lazy(IDS).logits, logits[fmt], atol=1e-5)
            # 4-bit on random gaussian weights: changed, but still the same model
            assert 0 < (logits[fmt] - base).abs().mean() < 0.5 * base.abs().mean()
    # the same RTN codes in three layouts give the same model (gptq stores zero-1, awq interleaves nibbles)
    assert torch.allclose(logits["gptq"], logits["awq"], atol=1e-4)
    assert torch.allclose(logits["gptq"], logits["compressed-tensors"], atol=1e-2)


def test_dtype_option(quantized):
    m = load_causal_lm(quantized["gptq"], dtype="bfloat16")
    assert m.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    with pytest.raises(BadInput):
        load_causal_lm(quantized["gptq"], dtype="int3")


def test_bad_inputs(tmp_path, quantized):
    with pytest.raises(BadInput):
        load_causal_lm(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInput, match="config.json"):
        load_causal_lm(tmp_path / "empty")
    broken = tmp_path / "broken"
    shutil.copytree(quantized["awq"], broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["num_hidden_layers"] = 1  # the checkpoint has tensors of a second layer
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CorruptFile):
        load_causal_lm(broken)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda(quantized):
    for path in quantized.values():
        for once in (True, False):
            m = load_causal_lm(path, device="cuda", unpack_once=once)
            with torch.no_grad():
                gpu = m(IDS.cuda()).logits.float().cpu()
            cpu = load_causal_lm(path)(IDS).logits
            assert torch.allclose(gpu, cpu, atol=0.05, rtol=0.05)
