"""Every family added through llmq/archs/: tiny random checkpoints built with transformers' config classes,
HF -> GGUF -> HF bit-identical, llama.cpp's logits on the GGUF equal transformers', and a GGUF without llmq's
embedded source config (metadata keys only) still converts back to the same model."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest

from llmq.archs import for_gguf
from llmq.conversion import SOURCE_CONFIG_KEY, convert, gguf_config
from llmq.errors import UnsupportedType
from llmq.io import GGUFReader, open_checkpoint
from tests.archs_models import make_family_model
from tests.test_convert import _hf_logits, _llama_logits

pytest.importorskip("transformers")
FAMILIES = ["gemma3", "phi3", "olmo2", "granite"]
TOKENS = list(range(3, 67))  # 64 tokens: past Gemma 3's 16-token sliding window in the tiny model


@pytest.fixture(scope="module", params=FAMILIES)
def converted(request, tmp_path_factory):
    family = request.param
    d = tmp_path_factory.mktemp(family)
    hf = make_family_model(
        d / "hf", family
    )  # not named after the family: llama.cpp keys vocab rules on names
    gg = d / "model-f32.gguf"
    res = convert(hf, gg, "f32")
    return family, hf, gg, res


def test_gguf_round_trip_is_bit_identical(converted, tmp_path):
    family, hf, gg, res = converted
    assert res.arch == family
    back = tmp_path / "back"
    convert(gg, back)
    src, dst = open_checkpoint(hf), open_checkpoint(back)
    assert set(dst.names()) == set(src.names()) - ({"lm_head.weight"} if family == "gemma3" else set())
    fam = for_gguf(family)
    for name in dst.names():
        a, b = src.read_raw(name), dst.read_raw(name)
        if fam.norm_shift and name.endswith("norm.weight"):
            # llama.cpp stores Gemma's norms as 1 + w in f32: w comes back within one ulp of 1 + w, not exactly
            assert np.abs(a - b).max() <= np.spacing(np.float32(1 + np.abs(a).max())), name
        else:
            assert np.array_equal(a, b), name
    cfg_src = json.loads((hf / "config.json").read_text())
    cfg_dst = json.loads((back / "config.json").read_text())
    assert {k: v for k, v in cfg_dst.items() if k != "dtype"} == {
        k: v for k, v in cfg_src.items() if k != "dtype"
    }


def test_llama_cpp_logits_match_transformers(converted, tmp_path):
    family, hf, gg, _ = converted
    want = _hf_logits(hf, TOKENS)
    got = _llama_logits(gg, TOKENS)
    assert np.abs(got - want).max() < 2e-3 * max(1.0, np.abs(want).max()), family
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_gguf_metadata_alone_rebuilds_the_model(converted, tmp_path):
    """The config GGUF -> HF derives from llama.cpp's keys (no llmq.hf_config) loads to the same logits."""
    family, hf, gg, _ = converted
    back = tmp_path / "back"
    convert(gg, back)
    with GGUFReader(gg) as r:
        meta = {k: v for k, v in r.metadata.items() if k != SOURCE_CONFIG_KEY}
        shim = types.SimpleNamespace(metadata=meta, path=r.path, info=r.info, names=r.names)
        if family == "phi3":  # longrope factors are tensors: HF needs them in the config
            with pytest.raises(UnsupportedType, match="rope_factors_long"):
                gguf_config(shim, for_gguf(r.arch), "float32")
            return
        cfg = gguf_config(shim, for_gguf(r.arch), "float32")
    (back / "config.json").write_text(json.dumps(cfg))
    got = _hf_logits(back, TOKENS)
    want = _hf_logits(hf, TOKENS)
    assert np.abs(got - want).max() < 1e-4 * max(1.0, np.abs(want).max()), family


@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0"])
def test_outtypes_convert(converted, tmp_path, outtype):
    family, hf, _, _ = converted
    res = convert(hf, tmp_path / "m.gguf", outtype)
    want = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}[outtype]
    assert res.types.get(want, 0) > 0 and set(res.types) <= {want, "F32", "F16"}


def test_gemma3_multimodal_language_model(tmp_path):
    """A Gemma3ForConditionalGeneration checkpoint converts its language model; the vision tower is left out."""
    import torch
    import transformers

    from tests.archs_models import _config
    from tests.helpers import write_spm_tokenizer

    text = _config("gemma3", 512)
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14)  # fmt: skip
    cfg = transformers.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                                    image_token_index=511, boi_token_index=509, eoi_token_index=510)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(cfg).float()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.08) if p.dim() == 2 else p.uniform_(-0.2, 0.2)
    hf = tmp_path / "mm"
    model.save_pretrained(hf)
    write_spm_tokenizer(hf, 512)
    gg = tmp_path / "mm.gguf"
    res = convert(hf, gg, "f32")
    assert res.arch == "gemma3"
    with GGUFReader(gg) as r:
        assert not [n for n in r.names() if "vision" in n or "mm" in n.split(".")[0]]
    with torch.inference_mode():
        want = model(input_ids=torch.tensor([TOKENS])).logits[0].numpy()
    got = _llama_logits(gg, TOKENS)
    assert np.abs(got - want).max() < 2e-3 * max(1.0, np.abs(want).max())
    back = tmp_path / "back"
    convert(gg, back)  # the language model alone, as Gemma3ForCausalLM
    assert json.loads((back / "config.json").read_text())["architectures"] == ["Gemma3ForCausalLM"]
    assert np.abs(_hf_logits(back, TOKENS) - want).max() < 1e-4 * max(1.0, np.abs(want).max())
    from llmq.errors import UnsupportedArchitecture
    from llmq.quant.blockwise.gptq import GPTQConfig
    from llmq.quant.blockwise.pipeline import make_plan, open_source

    src = open_source(hf)
    with pytest.raises(UnsupportedArchitecture, match="multimodal"):
        make_plan(src, GPTQConfig(format="fake-quant"))
    src.close()


@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q3_K_M", "Q2_K", "Q6_K"])
def test_gguf_mix_equals_llama_quantize(converted, tmp_path, ftype):
    """`llmq quantize --method gguf` on the family's GGUF is byte-identical to llama-quantize's output."""
    pytest.importorskip("llama_cpp")
    from llmq.cli.app import main
    from tests.gguf_helpers import llama_quantize

    _, _, gg, _ = converted
    ref, ours = tmp_path / "ref.gguf", tmp_path / "ours.gguf"
    llama_quantize(gg, ref, ftype)
    with pytest.raises(SystemExit) as e:
        main(["quantize", str(gg), "-o", str(ours), "--method", "gguf", "--type", ftype])
    assert not e.value.code
    with GGUFReader(ref) as a, GGUFReader(ours) as b:
        assert {t.name: t.dtype for t in a.infos()} == {t.name: t.dtype for t in b.infos()}
    assert ref.read_bytes() == ours.read_bytes()


@pytest.mark.parametrize("family", ["phi3", "olmo2", "granite"])
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_blockwise_quantizes_every_linear(tmp_path, family, method):
    """GPTQ/AWQ follow the family's sequential groups (Phi-3's fused qkv_proj and gate_up_proj included); at
    8 bits the fake-quantized model stays close to the original in transformers."""
    import torch

    from llmq.quant.blockwise.awq import AWQBlockMethod, AWQConfig
    from llmq.quant.blockwise.gptq import GPTQBlockMethod, GPTQConfig
    from llmq.quant.blockwise.pipeline import make_plan, open_source, quantize_blockwise
    from tests.test_sequential import logits, samples

    hf = make_family_model(tmp_path / "hf", family)
    cfg_cls, method_cls = {"gptq": (GPTQConfig, GPTQBlockMethod), "awq": (AWQConfig, AWQBlockMethod)}[method]
    cfg = cfg_cls(format="fake-quant", nsamples=8, seqlen=32, group_size=32, bits=8)
    src = open_source(hf)
    plan = make_plan(src, cfg)
    src.close()
    fused = {"phi3": {"self_attn.qkv_proj", "mlp.gate_up_proj"}}.get(
        family, {"self_attn.q_proj", "mlp.gate_proj"}
    )
    assert fused <= set(plan.targets[0]) and len(plan.targets) == 2
    quantize_blockwise(hf, tmp_path / "q", cfg, method_cls(cfg), method, samples=samples(8, 32, vocab=512))
    ids = samples(2, 16, vocab=512, seed=5)
    ref, got = logits(hf, ids), logits(tmp_path / "q", ids)
    assert not torch.equal(ref, got)
    assert float((got - ref).abs().max() / ref.abs().max()) < 0.05


def test_estimate_follows_llama_cpp_swa_rules(tmp_path):
    """Gemma 3's GGUF caches 5 of 6 layers in the window; Phi-3's window is ignored by llama.cpp (all full)."""
    from llmq.estimate.arch import FULL, SWA, from_gguf

    for family, want in (("gemma3", [SWA] * 5 + [FULL]), ("phi3", [FULL, FULL])):
        hf = make_family_model(tmp_path / family, family)
        cfg = json.loads((hf / "config.json").read_text())
        if family == "phi3":
            cfg["sliding_window"] = 64
            (hf / "config.json").write_text(json.dumps(cfg))
        gg = tmp_path / f"{family}.gguf"
        convert(hf, gg, "f32")
        with GGUFReader(gg) as r:
            assert r.metadata[f"{family}.attention.sliding_window"] == (16 if family == "gemma3" else 64)
            a = from_gguf(r.metadata, list(r.infos()))
        assert a.layer_kinds == want, family
