"""NF4/FP4: differential against bitsandbytes, and the saved layout against transformers' own save."""

from __future__ import annotations

import json

import pytest
import torch

from llmq.errors import BadInput
from llmq.formats.packing import pack_nibbles_high_first, unpack_nibbles_high_first
from llmq.quant.layerwise.nf4 import (
    NF4_CODE,
    NF4Config,
    NF4Quantizer,
    dynamic_map,
    quantize_4bit,
)


def test_nibble_order_first_value_high():
    assert pack_nibbles_high_first(torch.tensor([1, 2, 3])).flatten().tolist() == [0x12, 0x30]
    assert unpack_nibbles_high_first(torch.tensor([[0x12], [0x30]], dtype=torch.uint8), 3).tolist() == [
        1,
        2,
        3,
    ]


def test_nf4_codebook_and_round_trip_without_bitsandbytes():
    assert len(NF4_CODE) == 16 and NF4_CODE[0] == -1.0 and NF4_CODE[7] == 0.0 and NF4_CODE[15] == 1.0
    torch.manual_seed(0)
    W = torch.randn(32, 100)  # 3200 values: 50 blocks
    q = quantize_4bit(W, "nf4", 64)
    assert q.packed.shape == (1600, 1) and q.packed.dtype == torch.uint8 and q.absmax.shape == (50,)
    deq = q.dequantize(torch.float32)
    # each value lands on the nearest code: error at most half the widest codebook gap times the block absmax
    gap = max(b - a for a, b in zip(NF4_CODE, NF4_CODE[1:]))
    absmax = q.absmax.repeat_interleave(64)
    assert bool(((deq.flatten() - W.flatten()).abs() <= absmax * gap / 2 + 1e-6).all())
    dq = quantize_4bit(W, "nf4", 64, double_quant=True)
    assert (
        dq.absmax.dtype == torch.uint8 and dq.nested_absmax.shape == (1,) and dq.nested_code.shape == (256,)
    )
    assert (dq.dequantize(torch.float32) - deq).abs().max() < 0.02
    with pytest.raises(BadInput):
        quantize_4bit(W, "nf3")
    with pytest.raises(BadInput):
        NF4Config(blocksize=48)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 128), (33, 70)])
def test_matches_bitsandbytes_quantize_4bit(quant_type, dtype, shape):
    F = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(hash((quant_type, shape)) % 1000)
    W = (torch.randn(shape) * 0.1).to(dtype)
    packed, state = F.quantize_4bit(W, blocksize=64, quant_type=quant_type, compress_statistics=False)
    q = quantize_4bit(W, quant_type, 64)
    assert torch.equal(packed, q.packed)
    assert torch.equal(state.absmax, q.absmax)
    assert torch.equal(state.code, q.code)
    assert torch.equal(F.dequantize_4bit(packed, state), q.dequantize())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_double_quant_against_bitsandbytes(quant_type):
    F = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(1)
    W = (torch.randn(256, 576) * 0.05).to(torch.bfloat16)
    packed, state = F.quantize_4bit(W, blocksize=64, quant_type=quant_type, compress_statistics=True)
    q = quantize_4bit(W, quant_type, 64, double_quant=True)
    assert torch.equal(packed, q.packed)
    assert state.offset.item() == q.offset
    assert torch.equal(state.state2.absmax, q.nested_absmax)
    assert torch.equal(state.state2.code, q.nested_code) and torch.equal(state.state2.code, dynamic_map())
    # bitsandbytes' native CPU kernel is not always nearest on the 8-bit absmax codes: allow one step on <1%
    diff = (state.absmax.int() - q.absmax.int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.01
    # and bitsandbytes dequantizes llmq's state to llmq's values
    state.absmax = q.absmax
    assert torch.equal(F.dequantize_4bit(q.packed, state), q.dequantize())


@pytest.fixture(scope="module")
def bnb_outputs(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("bnb")
    outs = {}
    for dq in (False, True):
        outs[dq] = root / f"llmq-{dq}"
        NF4Quantizer().run(tiny_llama, outs[dq], NF4Config(double_quant=dq, compute_dtype="float32"))
    return outs


def test_layout_equals_what_transformers_saves(tiny_llama, bnb_outputs, tmp_path):
    """transformers + bitsandbytes quantize the same model on CPU and save it: every tensor must be identical."""
    pytest.importorskip("bitsandbytes")
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb_cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False,
                                 bnb_4bit_compute_dtype=torch.float32)  # fmt: skip
    m = AutoModelForCausalLM.from_pretrained(tiny_llama, quantization_config=bnb_cfg, device_map="cpu")
    m.save_pretrained(tmp_path / "tf")
    with safe_open(str(tmp_path / "tf" / "model.safetensors"), "pt") as a:
        ref = {k: a.get_tensor(k) for k in a.keys()}
    out = bnb_outputs[False]
    mine = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), "pt") as b:
            mine.update({k: b.get_tensor(k) for k in b.keys()})
    assert set(ref) == set(mine)
    for k in ref:
        assert ref[k].dtype == mine[k].dtype and torch.equal(ref[k], mine[k]), k
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    tqc = json.loads((tmp_path / "tf" / "config.json").read_text())["quantization_config"]
    assert {k: v for k, v in qc.items() if k != "llm_int8_skip_modules"} == {
        k: v for k, v in tqc.items() if k != "llm_int8_skip_modules"
    }


@pytest.mark.parametrize("dq", [False, True])
def test_transformers_loads_llmq_bnb_on_cpu(bnb_outputs, dq):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    from llmq.models.load import load_causal_lm

    out = bnb_outputs[dq]
    m = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    lin = m.model.layers[0].mlp.down_proj
    assert type(lin).__name__ == "Linear4bit"
    import bitsandbytes.functional as F

    theirs = F.dequantize_4bit(lin.weight.data, lin.weight.quant_state).float()
    mine = load_causal_lm(out).model.layers[0].mlp.down_proj.dequantized_weight()
    assert torch.equal(theirs, mine)
    # bitsandbytes >= 0.49 repacks Linear4bit weights for a fused AVX512-BF16 CPU
    # kernel on the first eval forward; that kernel computes in bf16, so logits
    # drift by ~1e-2.  Switch it off per module so the forward is bnb's own
    # dequantize + fp32 matmul, which must match llmq's to 1e-3 only if llmq's
    # packing (nibble order, absmax, shapes) is right.
    for mod in m.modules():
        if hasattr(mod, "support_avx512bf16_for_cpu"):
            mod.support_avx512bf16_for_cpu = False
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(m(ids).logits.float(), load_causal_lm(out)(ids).logits, atol=1e-3)
