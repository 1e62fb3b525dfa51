"""The estimator against reality: the bytes torch allocates for parameters and KV cache (transformers), and the
model-buffer and KV-cache sizes llama.cpp reports in its verbose log (llama-cpp-python), for SmolLM2 and for a
generated GGUF with sliding-window layers and mixed tensor types."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmq.estimate.memory import EstimateConfig, estimate_memory
from llmq.estimate.sources import load_model
from tests.estimate_helpers import llama_log as _llama_log
from tests.estimate_helpers import make_swa_gguf
from tests.estimate_helpers import parse_llama_log as _parse

MiB = 1024 * 1024


def _term(est, name: str, i: int = 0) -> int:
    return sum(t.nbytes for t in est.results[i].terms if t.name == name)


# ----------------------------------------------------------------------------------------- transformers / torch


def _torch_param_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():  # parameters() already yields a tied weight once; the set makes sure
        if p.data_ptr() in seen and p.device.type != "meta":
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_llama_odd"])
def test_weights_equal_torch_allocation(fixture: str, request) -> None:
    import transformers

    path: Path = request.getfixturevalue(fixture)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype="auto")
    est = estimate_memory(EstimateConfig(str(path), engine="transformers"))
    assert _term(est, "weights") == _torch_param_bytes(model)  # exact, to the byte


@pytest.mark.parametrize(
    "arch,extra",
    [
        ("llama", {"tie_word_embeddings": True}),
        ("qwen2", {}),
        ("qwen3", {"head_dim": 96}),
        ("mistral", {"sliding_window": 64}),
        ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}),
        ("deepseek_v3", {"kv_lora_rank": 64, "q_lora_rank": 96, "qk_rope_head_dim": 16, "qk_nope_head_dim": 32,
                         "v_head_dim": 32, "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                         "n_shared_experts": 1, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1}),
    ],
)  # fmt: skip
def test_bare_config_matches_torch_parameters(arch: str, extra: dict, tmp_path: Path) -> None:
    """A config.json alone (no headers): the synthesized tensors have the parameters transformers builds."""
    import json

    import torch
    import transformers

    kw = dict(hidden_size=192, intermediate_size=320, num_hidden_layers=3, num_attention_heads=6,
              num_key_value_heads=2, vocab_size=1000, max_position_embeddings=512)  # fmt: skip
    kw.update(extra)
    cfg = transformers.AutoConfig.for_model(arch, **kw)
    cfg.dtype = torch.bfloat16
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg.to_dict(), default=str))
    est = estimate_memory(EstimateConfig(str(path), engine="transformers"))
    n_params = sum(p.numel() for p in model.parameters())
    assert est.results[0].params_total == n_params
    assert _term(est, "weights") == n_params * 2
    if "num_local_experts" in extra or "n_routed_experts" in extra:
        assert est.results[0].params_active < n_params


def _cache_bytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if t is not None and hasattr(t, "numel"):
                total += t.numel() * t.element_size()
    return total


@pytest.mark.parametrize("context,batch", [(37, 1), (64, 3)])
def test_kv_equals_transformers_dynamic_cache(tiny_llama: Path, context: int, batch: int) -> None:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype="auto")
    ids = torch.randint(0, model.config.vocab_size, (batch, context))
    with torch.no_grad():
        out = model(ids, use_cache=True)
    est = estimate_memory(
        EstimateConfig(str(tiny_llama), engine="transformers", context=context, batch=batch)
    )
    assert _term(est, "KV cache K") + _term(est, "KV cache V") == _cache_bytes(out.past_key_values)


# ----------------------------------------------------------------------------------------- llama.cpp


def _mib(n: int) -> float:
    return float(f"{n / MiB:.2f}")


GGML_CACHE = {"f16": 1, "q8_0": 8, "q4_0": 2}


def _check_llama_cpp(
    path: Path, n_ctx: int, cache: str, flash_attn: bool, swa_full: bool | None = None
) -> None:
    extra = {} if swa_full is None else {"swa_full": swa_full}
    log = _parse(_llama_log(path, n_ctx=n_ctx, type_k=GGML_CACHE[cache], type_v=GGML_CACHE[cache],
                            flash_attn=flash_attn, **extra))  # fmt: skip
    est = estimate_memory(EstimateConfig(str(path), engine="llama.cpp", context=n_ctx, kv_cache_dtype=cache,
                                         flash_attn=flash_attn, swa_full=swa_full is not False))  # fmt: skip
    src = load_model(str(path))
    # weights: llama.cpp's own byte count (exact) and its mapped buffer (the GGUF data span, to the log's 0.01 MiB)
    assert log["model_size"] == sum(t.nbytes for t in src.tensors)
    assert log["model_buffer"] == [_mib(_term(est, "weights"))]
    # KV cache: one log line per cache (two with SWA); cells and K/V sizes to the log's 0.01 MiB
    k, v = _term(est, "KV cache K"), _term(est, "KV cache V")
    assert sum(line[2] for line in log["kv"]) == pytest.approx(k / MiB, abs=0.005 * len(log["kv"]) + 1e-9)
    assert sum(line[4] for line in log["kv"]) == pytest.approx(v / MiB, abs=0.005 * len(log["kv"]) + 1e-9)
    assert all(line[1] == line[3] == cache for line in log["kv"])
    layout_cells = {est.results[0].terms[1].formula}  # formula names the padded cell counts
    for cells, *_ in log["kv"]:
        assert any(f"= {cells}" in f for f in layout_cells), (cells, layout_cells)
    assert _mib(_term(est, "output buffer")) == log["output"]


llama_cases = [
    (512, "f16", True),
    (1000, "q8_0", True),
    (2048, "q4_0", True),
    (300, "f16", False),
    (4096, "q8_0", True),
]


@pytest.mark.parametrize("n_ctx,cache,fa", llama_cases)
def test_llama_cpp_smollm2(smollm2_gguf_path: Path, n_ctx: int, cache: str, fa: bool) -> None:
    pytest.importorskip("llama_cpp")
    _check_llama_cpp(smollm2_gguf_path, n_ctx, cache, fa)


@pytest.fixture(scope="session")
def generated_gguf(smollm2_gguf_path: Path, tmp_path_factory) -> Path:
    return make_swa_gguf(smollm2_gguf_path, tmp_path_factory.mktemp("gen") / "gen-gemma2.gguf")


@pytest.mark.parametrize("n_ctx,cache,fa,swa_full", [(512, "f16", True, None), (1000, "q8_0", True, False),
                                                     (3000, "q4_0", True, False), (700, "f16", False, False),
                                                     (3000, "f16", True, True)])  # fmt: skip
def test_llama_cpp_generated_swa(generated_gguf: Path, n_ctx: int, cache: str, fa: bool, swa_full) -> None:
    pytest.importorskip("llama_cpp")
    _check_llama_cpp(generated_gguf, n_ctx, cache, fa, swa_full)
    est = estimate_memory(EstimateConfig(str(generated_gguf), context=n_ctx, kv_cache_dtype=cache))
    assert est.arch["layer_kinds"] == {"full": 2, "swa": 2}


def test_llama_cpp_refuses_quantized_v_without_flash_attn(smollm2_gguf_path: Path) -> None:
    from llmq.errors import BadInput

    with pytest.raises(BadInput, match="flash attention"):
        estimate_memory(EstimateConfig(str(smollm2_gguf_path), kv_cache_dtype="q8_0", flash_attn=False))


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_bytes_equal_bitsandbytes_checkpoint(
    tiny_llama: Path, tmp_path: Path, double_quant: bool
) -> None:
    """What transformers + bitsandbytes save for a 4-bit model: exact without double quant; with it, the only
    inexact term is the length of the JSON float repr of nested_offset (a byte or two per Linear)."""
    pytest.importorskip("bitsandbytes")
    import torch
    import transformers

    q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                                        bnb_4bit_use_double_quant=double_quant)  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tiny_llama, quantization_config=q, device_map="cpu"
    )
    model.save_pretrained(tmp_path / "bnb")
    saved = sum(t.nbytes for t in load_model(str(tmp_path / "bnb")).tensors)
    est = estimate_memory(EstimateConfig(str(tiny_llama), quants=("nf4-dq" if double_quant else "nf4",),
                                         engine="transformers"))  # fmt: skip
    r = est.results[0]
    if double_quant:
        assert abs(r.weights_bytes - saved) <= 2 * r.n_quantized
    else:
        assert r.weights_bytes == saved


def _llama_quantize(src: Path, dst: Path, ftype: str) -> None:
    import ctypes

    llama_cpp = pytest.importorskip("llama_cpp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.allow_requantize = True
    params.nthread = 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0


def _needs_gguf_mix() -> None:
    try:
        import llmq.quant.gguf.mix  # noqa: F401
    except ImportError:
        pytest.skip("llmq.quant.gguf.mix (the GGUF quantizer's type rules) has not landed on main yet")


@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q8_0", "Q3_K_S"])
def test_gguf_target_equals_llama_quantize_output(
    smollm2_gguf_path: Path, tmp_path: Path, ftype: str
) -> None:
    """Requantizing SmolLM2 with llama.cpp itself: every tensor's type and byte count as the estimate says."""
    _needs_gguf_mix()
    pytest.importorskip("llama_cpp")
    out = tmp_path / f"smol-{ftype}.gguf"
    _llama_quantize(smollm2_gguf_path, out, ftype)
    real = load_model(str(out))
    est = estimate_memory(EstimateConfig(str(smollm2_gguf_path), quants=(ftype,), engine="llama.cpp"))
    assert est.results[0].weights_bytes == real.gguf_data_span  # exact, to the byte


def test_gguf_target_from_hf_checkpoint(tiny_llama: Path, tmp_path: Path) -> None:
    """HF names go through gguf-py's TensorNameMap; the mix then matches llama-quantize on llmq's F16 GGUF."""
    _needs_gguf_mix()
    pytest.importorskip("llama_cpp")
    from llmq.conversion import convert

    f16 = tmp_path / "tiny-f16.gguf"
    convert(tiny_llama, f16, outtype="f16")
    out = tmp_path / "tiny-q4km.gguf"
    _llama_quantize(f16, out, "Q4_K_M")
    est = estimate_memory(EstimateConfig(str(tiny_llama), quants=("Q4_K_M", "F16"), engine="llama.cpp"))
    assert est.results[0].weights_bytes == load_model(str(out)).gguf_data_span
    assert est.results[1].weights_bytes == load_model(str(f16)).gguf_data_span
