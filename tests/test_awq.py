"""AWQ: scale folding is exact, the search helps, formats load back (tiny random llama)."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llmq.archs import FAMILIES as ARCHES  # noqa: E402
from llmq.errors import BadInput  # noqa: E402
from llmq.quant.blockwise.awq import AWQBlockMethod, AWQConfig, _w_mean  # noqa: E402
from llmq.quant.blockwise.pipeline import (  # noqa: E402  # noqa: E402
    BlockContext,
    _skeleton,
    capture_first_inputs,
    materialize,
    open_source,
    quantize_blockwise,
)
from llmq.quant.grid import fake_quantize  # noqa: E402
from tests.test_sequential import logits, make_tiny_llama, samples  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # no GQA (heads == kv heads) so the v -> o scaling group is searched too
    return make_tiny_llama(tmp_path_factory.mktemp("awq") / "m", heads=4, kv_heads=4)


def run_awq(src, out, **kw):
    config = AWQConfig(**{"format": "fake-quant", "group_size": 32, "nsamples": 8, "seqlen": 32, **kw})
    return quantize_blockwise(src, out, config, AWQBlockMethod(config), "awq", samples=samples())


def block_ctx(src, ids):
    torch.set_grad_enabled(False)
    reader = open_source(src)
    _, model = _skeleton(src)
    hidden, kwargs = capture_first_inputs(model, reader, ids)
    layer = model.model.layers[0]
    materialize(layer, reader, "model.layers.0.")
    return BlockContext(0, "model.layers.0.", layer, ARCHES["llama"], list(ARCHES["llama"].linears), hidden,
                        kwargs, [])  # fmt: skip


def test_scale_folding_keeps_the_block_function(tiny):
    ctx = block_ctx(tiny, samples(2, 16))
    before = ctx.forward(0)
    method = AWQBlockMethod(AWQConfig(format="fake-quant", group_size=32))
    g = torch.Generator().manual_seed(1)
    for sg in ARCHES["llama"].scale_groups:
        s = torch.exp(torch.randn(ctx.module(sg.linears[0]).in_features, generator=g) * 0.3)
        method._apply_scale(ctx, sg, s)
    assert torch.allclose(ctx.forward(0), before, atol=1e-4)


def test_gemma_norm_offset_folding(tiny):
    ctx = block_ctx(tiny, samples(1, 16))
    norm = ctx.module("input_layernorm")
    w0 = norm.weight.detach().clone()
    ctx.arch = ARCHES["gemma"]
    s = torch.full_like(w0, 2.0)
    AWQBlockMethod(AWQConfig(format="fake-quant", group_size=32))._apply_scale(
        ctx, ARCHES["gemma"].scale_groups[0], s
    )
    assert torch.allclose(norm.weight, (1 + w0) / 2 - 1)


def test_w_mean_normalises_per_group():
    W = torch.tensor([[1.0, 2.0, 4.0, 8.0], [2.0, 2.0, 2.0, 2.0]])
    assert torch.allclose(_w_mean(W, 2), torch.tensor([0.75, 1.0, 0.75, 1.0]))


def test_awq_beats_rtn_and_folds_into_norms(tiny, tmp_path):
    run_awq(tiny, tmp_path / "awq")
    ids = samples(4, 32, seed=11)
    ref = logits(tiny, ids).log_softmax(-1)
    rtn = transformers.AutoModelForCausalLM.from_pretrained(tiny)
    with torch.no_grad():
        for name, mod in rtn.named_modules():
            if isinstance(mod, torch.nn.Linear) and ".layers." in name:
                mod.weight.copy_(fake_quantize(mod.weight, 4, 32, False))
    kl = lambda lp: float((ref.exp() * (ref - lp)).sum(-1).mean())  # noqa: E731
    got = logits(tmp_path / "awq", ids).log_softmax(-1)
    assert kl(got) < kl(rtn(ids).logits.log_softmax(-1))
    a = open_source(tiny).read("model.layers.0.input_layernorm.weight")
    b = open_source(tmp_path / "awq").read("model.layers.0.input_layernorm.weight")
    assert not torch.equal(a, b)  # the scales live in the norm: no extra tensors
    assert set(open_source(tmp_path / "awq").names()) == set(open_source(tiny).names())


def test_gqa_skips_v_to_o(tmp_path, monkeypatch):
    src = make_tiny_llama(tmp_path / "m", heads=4, kv_heads=2)
    ctx = block_ctx(src, samples(2, 16))
    searched = []
    original = AWQBlockMethod._search_scale

    def spy(self, ctx, sg, *args):
        searched.append(sg.prev)
        return original(self, ctx, sg, *args)

    monkeypatch.setattr(AWQBlockMethod, "_search_scale", spy)
    records = AWQBlockMethod(AWQConfig(format="fake-quant", group_size=32)).quantize_block(ctx)
    # v's 32 output rows cannot be matched with o's 64 input columns under GQA: that group is left out
    assert searched == ["input_layernorm", "post_attention_layernorm", "mlp.up_proj"]
    assert set(records) == set(ARCHES["llama"].linears)


def test_config_validation():
    with pytest.raises(BadInput, match="awq"):
        AWQConfig(format="awq", sym=True)
    with pytest.raises(BadInput, match="awq"):
        AWQConfig(format="awq", bits=3)
    assert AWQConfig(format="gptq", bits=3).bits == 3
    cfg = AWQConfig.from_options("awq", {"group_size": 64, "nsamples": 16})
    assert AWQConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("fmt", ["awq", "gptq"])
def test_packed_formats_load_like_fake_quant(tiny, tmp_path, fmt):
    load = pytest.importorskip("llmq.models.load")
    run_awq(tiny, tmp_path / "fake")
    run_awq(tiny, tmp_path / fmt, format=fmt)
    cfg = json.loads((tmp_path / fmt / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == fmt
    ids = samples(2, 16, seed=4)
    a = load.load_causal_lm(tmp_path / fmt)(ids).logits
    b = logits(tmp_path / "fake", ids)
    assert torch.allclose(a, b, atol=2e-2, rtol=0)
