"""The public API re-exported from the package root: the functions the CLI is a layer over."""

from __future__ import annotations

import pytest

import llmq
from llmq.errors import BadInput


def test_api_round_trip(tiny_llama, tmp_path):
    gg = tmp_path / "t.gguf"
    assert llmq.convert(tiny_llama, gg, "f16").direction == "hf->gguf"
    rep = llmq.inspect(gg)
    assert rep["kind"] == "gguf" and rep["summary"]["types"]["F16"] > 0
    plan = llmq.api.quantize_plan(tiny_llama, "rtn", bits=4, group_size=64)
    assert plan["bits_per_weight"] < 16 and plan["tensors"]
    out = tmp_path / "rtn"
    res = llmq.quantize(tiny_llama, out, "rtn", bits=4, group_size=64, format="gptq")
    assert res.output == out and (out / "config.json").exists()
    with pytest.raises(BadInput, match="cannot be used with --method rtn"):
        llmq.quantize(tiny_llama, tmp_path / "x", "rtn", type="Q4_K_M")
    assert not (tmp_path / "x").exists()


def test_api_estimate_and_perplexity(tiny_llama):
    est = llmq.estimate_memory(str(tiny_llama), quants=("bf16", "nf4"), context=1024)
    assert [r.quant for r in est.results][:2] == ["bf16", "nf4"]
    assert est.results[1].weights_bytes < est.results[0].weights_bytes
    from llmq.eval.perplexity import PerplexityConfig

    result, _ = llmq.perplexity(str(tiny_llama), PerplexityConfig(dataset="pydocs", ctx=64, chunks=2))
    assert result.ppl.value > 1 and result.n_scored > 0
