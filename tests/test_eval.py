"""Evaluator tests on tiny random models (torch backend), protocols, KLD statistics and the base-logits file."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from llmq.errors import BackendError, BadInput, CalibrationError, CorruptFile, LlmqError
from llmq.eval.kld import BaseLogits, kld_stats, read_base_logits, write_base_logits
from llmq.eval.perplexity import (
    PerplexityConfig,
    compare,
    evaluate,
    llamacpp_windows,
    strided_windows,
)
from llmq.eval.scoring import Scorer

torch = pytest.importorskip("torch")


def _corpus() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))[:60000]


def _train_tokenizer(text: str, vocab_size: int, add_bos: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)  # fmt: skip
    tok.train_from_iterator([text], trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _tiny_llama(out: Path, tok, seed: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)  # fmt: skip
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(25.0)  # peaked distributions, so the KL terms are not all ~0
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval_models")
    text = _corpus()
    tok_bos = _train_tokenizer(text, 384, add_bos=True)
    tok_other = _train_tokenizer(text[:5000], 300, add_bos=False)
    data = root / "text.txt"
    data.write_text(text[:30000])
    return {
        "a": _tiny_llama(root / "a", tok_bos, 0),
        "b": _tiny_llama(root / "b", tok_bos, 1),
        "other": _tiny_llama(root / "other", tok_other, 2),
        "text": data,
    }


def _cfg(tiny, **kw) -> PerplexityConfig:
    return PerplexityConfig(**{"dataset": str(tiny["text"]), "ctx": 64, "chunks": 6, **kw})


# ---------------------------------------------------------------------------------------------- protocols


def test_llamacpp_windows_score_second_half_and_put_bos_first():
    tokens = np.arange(10, 10 + 1000, dtype=np.int32)
    (g,) = llamacpp_windows(tokens, 100, None, bos_id=1)
    assert g.windows.shape == (10, 100)
    assert (g.windows[:, 0] == 1).all() and g.windows[3, 1] == tokens[301]
    assert (g.start, g.stop) == (50, 99)  # 49 tokens scored per chunk, as llama-perplexity (n_ctx-1-first)
    assert np.array_equal(g.targets[2], tokens[251:300])
    (g2,) = llamacpp_windows(tokens, 100, 3, bos_id=None)
    assert g2.windows.shape == (3, 100) and g2.windows[0, 0] == tokens[0]


def test_llamacpp_windows_need_two_chunks():
    with pytest.raises(CalibrationError, match="at least 200"):
        llamacpp_windows(np.arange(199, dtype=np.int32), 100, None, None)


@pytest.mark.parametrize("n,ctx,stride", [(1000, 100, 50), (1003, 64, 64), (130, 128, 7), (50, 100, 30)])
def test_strided_windows_score_every_token_once(n, ctx, stride):
    tokens = np.arange(n, dtype=np.int32)
    groups = strided_windows(tokens, ctx, stride, None)
    scored = np.concatenate([g.targets.reshape(-1) for g in groups])
    assert (np.diff(scored) > 0).all() and scored[0] == 1  # in order, each at most once
    if stride < ctx:  # then every token but the first is scored (with stride == ctx, as in the guide,
        assert np.array_equal(scored, tokens[1:])  # each window's first token has no prediction)
    else:
        assert scored.size == n - 1 - (len(range(0, n - ctx, stride)))
    for g in groups:
        assert g.windows.shape[1] <= ctx
        # each target is the token right after its logit position
        assert np.array_equal(g.targets, g.windows[:, g.start + 1 : g.stop + 1])


def test_config_rejects_bad_values():
    with pytest.raises(BadInput):
        PerplexityConfig(ctx=2)
    with pytest.raises(BadInput):
        PerplexityConfig(ctx=64, stride=65)
    with pytest.raises(BadInput):
        PerplexityConfig(chunks=0)
    cfg = PerplexityConfig(ctx=128, stride=64)
    assert PerplexityConfig.from_dict(cfg.to_dict()) == cfg


# ---------------------------------------------------------------------------------------------- scoring / KLD


def _full_kld(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    lp, lq = p_logits.double().log_softmax(-1), q_logits.double().log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def _record(logits: torch.Tensor, targets: np.ndarray, k: int) -> BaseLogits:
    s = Scorer(logits.shape[1], record_top_k=k)
    s.add(logits.clone(), targets)
    return s.base_record(targets, {"n_vocab": logits.shape[1]})


def test_scorer_nll_and_exact_kld_with_full_top_k():
    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(40, 50, generator=g) * 3, torch.randn(40, 50, generator=g) * 3
    targets = torch.randint(0, 50, (40,), generator=g).numpy().astype(np.int32)
    base = _record(p, targets, k=50)
    s = Scorer(50, base=base)
    s.add(q.clone(), targets)
    ref_nll = torch.nn.functional.cross_entropy(
        q.double(), torch.from_numpy(targets).long(), reduction="none"
    )
    assert np.allclose(s.nll, ref_nll.numpy(), atol=1e-5)
    kld, p_diff, same = s.kld_arrays()
    assert np.allclose(kld, _full_kld(p, q).numpy(), atol=1e-5)
    assert np.array_equal(same, (p.argmax(-1) == q.argmax(-1)).numpy())
    assert np.allclose(p_diff, np.exp(-s.nll) - np.exp(-np.asarray(base.nll, dtype=np.float64)), atol=1e-6)


def test_compact_kld_is_a_tight_lower_bound():
    g = torch.Generator().manual_seed(1)
    p = torch.randn(64, 2000, generator=g) * 4
    q = p + torch.randn(64, 2000, generator=g) * 0.3
    targets = np.zeros(64, dtype=np.int32)
    full = _full_kld(p, q).numpy()
    s = Scorer(2000, base=_record(p, targets, k=32))
    s.add(q.clone(), targets)
    approx = s.kld_arrays()[0]
    assert (approx <= full + 1e-6).all()
    assert approx.mean() > 0.6 * full.mean()


def test_kld_stats_match_perplexity_cpp_formulas():
    rng = np.random.default_rng(0)
    nll_b = rng.gamma(2.0, 1.5, 500)
    nll = nll_b + rng.normal(0.05, 0.2, 500)
    kld = rng.gamma(1.0, 0.02, 500)
    p_diff = rng.normal(0, 0.05, 500)
    same = rng.random(500) < 0.9
    st = kld_stats(nll, nll_b, kld, p_diff, same)
    assert math.isclose(st.ppl.value, math.exp(nll.mean()))
    assert math.isclose(st.ppl.se, math.exp(nll.mean()) * math.sqrt(nll.var() / 499), rel_tol=1e-9)
    assert math.isclose(st.ppl_ratio.value, math.exp(nll.mean() - nll_b.mean()))
    diff = nll - nll_b  # ln-ratio standard error = standard error of the paired difference
    assert math.isclose(st.ln_ppl_ratio.se, math.sqrt(diff.var() / 499), rel_tol=1e-6)
    assert math.isclose(st.kld_mean.value, kld.mean()) and math.isclose(st.kld_median.value, np.median(kld),
                                                                         rel_tol=1e-6)  # fmt: skip
    assert math.isclose(st.kld_p99.value, np.percentile(kld, 99), rel_tol=1e-5)
    assert math.isclose(st.dp_rms.value, math.sqrt((p_diff**2).mean()))
    assert math.isclose(st.same_top.value, same.mean())
    assert st.kld_median.se > 0 and st.kld_p999.se >= 0


def test_base_file_roundtrip_and_corruption(tmp_path):
    rng = np.random.default_rng(0)
    base = BaseLogits(
        header={"protocol": "llamacpp", "ctx": 64, "stride": None, "chunks": 2, "n_vocab": 100},
        tokens=rng.integers(0, 100, 128).astype(np.int32),
        targets=rng.integers(0, 100, 62).astype(np.int32),
        nll=rng.random(62).astype(np.float32),
        topk_ids=rng.integers(0, 100, (62, 8)).astype(np.int32),
        topk_logp=-rng.random((62, 8)).astype(np.float32),
        log_rest=np.full(62, -np.inf, dtype=np.float32),
    )
    path = write_base_logits(tmp_path / "base.llmqkld", base)
    back = read_base_logits(path)
    for name, arr in base.arrays():
        assert np.array_equal(np.asarray(getattr(back, name)), arr)
    assert back.header["ctx"] == 64 and back.header["version"] == 1
    with pytest.raises(LlmqError):
        write_base_logits(path, base)  # exists, no force
    raw = path.read_bytes()
    (tmp_path / "trunc").write_bytes(raw[:-100])
    with pytest.raises(CorruptFile, match="truncated"):
        read_base_logits(tmp_path / "trunc")
    (tmp_path / "magic").write_bytes(b"NOTLLMQ!" + raw[8:])
    with pytest.raises(CorruptFile, match="magic"):
        read_base_logits(tmp_path / "magic")
    (tmp_path / "ver").write_bytes(raw[:8] + (99).to_bytes(4, "little") + raw[12:])
    with pytest.raises(CorruptFile, match="version"):
        read_base_logits(tmp_path / "ver")


# ---------------------------------------------------------------------------------------------- torch backend


def _plain_loop_ppl(model_dir: Path, text: str, ctx: int, chunks: int) -> float:
    """What a user writes with transformers: one chunk at a time, full logits, BOS first, second half scored."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok(text[:-1] if text.endswith("\n") else text)["input_ids"]
    nll, count = 0.0, 0
    with torch.no_grad():
        for c in range(chunks):
            chunk = torch.tensor([ids[c * ctx : (c + 1) * ctx]])
            chunk[0, 0] = tok.bos_token_id
            logits = model(chunk).logits[0].double()
            first = ctx // 2
            lp = logits[first : ctx - 1].log_softmax(-1)
            tgt = chunk[0, first + 1 :]
            nll += float(-lp.gather(1, tgt[:, None]).sum())
            count += ctx - 1 - first
    return math.exp(nll / count)


def test_torch_ppl_equals_plain_loop_any_batch(tiny):
    ref = _plain_loop_ppl(tiny["a"], tiny["text"].read_text(), 64, 6)
    r1, _ = evaluate(str(tiny["a"]), _cfg(tiny, batch=1))
    r4, _ = evaluate(str(tiny["a"]), _cfg(tiny, batch=4))
    again, _ = evaluate(str(tiny["a"]), _cfg(tiny, batch=4))
    assert r1.n_scored == 6 * 31 and r1.backend == "torch"
    assert math.isclose(r1.ppl.value, ref, rel_tol=1e-5)
    assert math.isclose(r4.ppl.value, ref, rel_tol=1e-5)
    assert again.ppl == r4.ppl  # deterministic
    assert r1.n_params > 0 and r1.bits_per_weight == pytest.approx(32.0, rel=0.01)


def test_torch_strided_equals_transformers_guide(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = tiny["text"].read_text()
    tok = AutoTokenizer.from_pretrained(tiny["a"])
    model = AutoModelForCausalLM.from_pretrained(tiny["a"], dtype=torch.float32).eval()
    ids = torch.tensor([tok(text[:-1] if text.endswith("\n") else text)["input_ids"][:400]])
    max_length, stride, nll_sum, n_tokens, prev_end = 64, 24, 0.0, 0, 0
    for begin in range(0, ids.size(1), stride):  # the transformers perplexity guide, verbatim in spirit
        end = min(begin + max_length, ids.size(1))
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        # The guide subtracts one label per window; the loss really averages the shifted valid labels.
        valid = int((target_ids[:, 1:] != -100).sum())
        nll_sum += float(loss) * valid
        n_tokens += valid
        prev_end = end
        if end == ids.size(1):
            break
    ref = math.exp(nll_sum / n_tokens)
    r, _ = evaluate(str(tiny["a"]), _cfg(tiny, stride=stride, chunks=None), tokens=ids[0].numpy())
    assert r.n_scored == n_tokens
    assert math.isclose(r.ppl.value, ref, rel_tol=1e-5)


def test_kld_against_base_model_and_saved_file(tiny, tmp_path):
    cfg = _cfg(tiny, top_k=16)
    base_res, (same, other) = compare([str(tiny["a"]), str(tiny["b"])], cfg, base=str(tiny["a"]),
                                      save_base=tmp_path / "base.bin")  # fmt: skip
    assert same.kld.kld_mean.value == pytest.approx(0.0, abs=1e-6)
    assert same.kld.same_top.value == 1.0 and same.kld.ppl_ratio.value == pytest.approx(1.0, abs=1e-6)
    assert other.kld.kld_mean.value > 0.01 and other.kld.kld_mean.se > 0
    assert other.kld.ppl_base.value == pytest.approx(base_res.ppl.value, rel=1e-6)
    _, (from_file,) = compare(
        [str(tiny["b"])], PerplexityConfig(dataset=cfg.dataset), base=str(tmp_path / "base.bin")
    )
    assert from_file.kld.kld_mean.value == pytest.approx(other.kld.kld_mean.value, rel=1e-6)
    assert from_file.ppl.value == pytest.approx(other.ppl.value, rel=1e-6)


def test_refuses_base_with_other_vocabulary(tiny):
    with pytest.raises(BadInput, match="vocabulary"):
        compare([str(tiny["other"])], _cfg(tiny), base=str(tiny["a"]))


def test_bad_inputs(tiny, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(CalibrationError, match="empty"):
        evaluate(str(tiny["a"]), _cfg(tiny, dataset=str(empty)))
    short = tmp_path / "short.txt"
    short.write_text("just a few words here\n")
    with pytest.raises(CalibrationError, match="tokens"):
        evaluate(str(tiny["a"]), _cfg(tiny, dataset=str(short)))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 10}))
    with pytest.raises(BadInput, match="no .safetensors"):  # refused before a default-size model is built
        evaluate(str(broken), _cfg(tiny))
    for f in Path(tiny["a"]).glob("*.safetensors"):
        os.link(f, broken / f.name)
    (broken / "config.json").write_text(json.dumps({"model_type": "fancynet", "vocab_size": 10}))
    with pytest.raises(BackendError, match="fancynet"):
        evaluate(str(broken), _cfg(tiny))
    with pytest.raises(BadInput, match="not found|no such file"):
        evaluate(str(tmp_path / "nope"), _cfg(tiny))
    with pytest.raises(BadInput, match="GGUF"):
        evaluate(str(tiny["a"]), _cfg(tiny, backend="llamacpp"))


# ---------------------------------------------------------------------------------------------- CLI


def _cli(args: list[str]):
    import typer
    from typer.testing import CliRunner

    from llmq.cli.eval import register

    app = typer.Typer()
    register(app)

    @app.callback()
    def _root() -> None:
        pass

    return CliRunner().invoke(app, args)


def test_cli_json_output_chart(tiny, tmp_path):
    pytest.importorskip("matplotlib")
    out, chart = tmp_path / "res.json", tmp_path / "chart.png"
    args = ["eval", "perplexity", str(tiny["b"]), "--base", str(tiny["a"]), "--dataset", str(tiny["text"]),
            "--ctx", "64", "--chunks", "3", "--json", "--output", str(out), "--chart", str(chart)]  # fmt: skip
    r = _cli(args)
    assert r.exit_code == 0, r.output
    saved = json.loads(out.read_text())
    assert saved["base"]["ppl"]["value"] > 1 and saved["results"][0]["kld"]["kld_mean"]["value"] > 0
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = _cli(args)  # outputs exist, no --force: refused before any evaluation
    assert isinstance(r.exception, LlmqError) and "exists" in str(r.exception)
    r = _cli(
        ["eval", "perplexity", str(tiny["a"]), "--dataset", str(tiny["text"]), "--ctx", "64", "--chunks", "2"]
    )
    assert r.exit_code == 0 and "PPL" in r.output


def test_long_text_warning_silenced(tiny, tmp_path):
    """Tokenizing the whole evaluation text at once is intended: transformers' "longer than the specified
    maximum" warning must not reach the user, while the same tokenizer called directly still warns."""
    import shutil
    import subprocess
    import sys

    model = tmp_path / "short-max"
    shutil.copytree(tiny["a"], model)
    conf = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps(conf | {"model_max_length": 64}))
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from llmq.eval.backends import TorchBackend\n"
        f"text = Path({str(tiny['text'])!r}).read_text()\n"
        f"be = TorchBackend(Path({str(model)!r}))\n"
        "ids = be.tokenize(text)\n"
        "print('MARK', len(ids), be._tok.model_max_length, file=sys.stderr, flush=True)\n"
        "from transformers import AutoTokenizer\n"
        f"AutoTokenizer.from_pretrained({str(model)!r})(text)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    before, _, after = proc.stderr.partition("MARK")
    n, limit = map(int, after.split()[:2])
    assert n > limit == 64  # the warning's condition holds
    assert "Token indices sequence length" not in before
    assert "Token indices sequence length" in after  # the control: only llmq's call is silenced
