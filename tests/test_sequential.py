"""The shared block-by-block pipeline: planning, calibration checks, resume, outputs (tiny random llama)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llmq.archs import FAMILIES as ARCHES  # noqa: E402
from llmq.archs import for_model_type as arch_for_config  # noqa: E402
from llmq.errors import BadInput, CalibrationError, OutputExists, ShapeError, UnsupportedArchitecture  # noqa: E402
from llmq.quant.blockwise.gptq import GPTQBlockMethod, GPTQConfig  # noqa: E402
from llmq.quant.blockwise.pipeline import make_plan, open_source, quantize_blockwise  # noqa: E402


def make_tiny_llama(path: Path, *, layers: int = 2, hidden: int = 64, inter: int = 128, vocab: int = 256,
                    heads: int = 4, kv_heads: int = 2, model_type: str = "llama", seed: int = 0,
                    max_shard: str | None = None) -> Path:  # fmt: skip
    """A random but trained-looking (non-uniform channel scales) model saved as an HF directory."""
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "mistral": transformers.MistralConfig}[model_type]  # fmt: skip
    cfg = cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
              tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.5 * torch.rand_like(p))  # outlier-ish channels make AWQ/GPTQ matter
            elif p.dim() == 2:
                p.normal_(0, 0.08)
                p.mul_(torch.exp(torch.randn(p.shape[1]) * 0.5))
    kw = {"max_shard_size": max_shard} if max_shard else {}
    model.save_pretrained(path, **kw)
    return path


def samples(n: int = 8, seqlen: int = 32, vocab: int = 256, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seqlen), generator=g)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "m")


def logits(path: Path, ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    return model(ids).logits


def run_gptq(src: Path, out: Path, **kw):
    options = {"format": "fake-quant", "nsamples": 8, "seqlen": 32, "group_size": 32, **kw}
    config = GPTQConfig(**options)
    return quantize_blockwise(src, out, config, GPTQBlockMethod(config), "gptq", samples=samples())


def test_arch_table_is_declarative():
    assert arch_for_config({"model_type": "qwen3"}).name == "qwen3"
    assert ARCHES["gemma"].norm_offset == 1.0
    assert ARCHES["llama"].linears[:3] == ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    with pytest.raises(UnsupportedArchitecture, match="gpt2"):
        arch_for_config({"model_type": "gpt2"})


def test_fake_quant_output_loads_and_is_close(tiny, tmp_path):
    res = run_gptq(tiny, tmp_path / "q")
    ids = samples(2, 16, seed=5)
    ref, got = logits(tiny, ids), logits(tmp_path / "q", ids)
    assert not torch.equal(ref, got)  # something was quantized
    assert torch.nn.functional.cosine_similarity(ref.flatten(), got.flatten(), dim=0) > 0.85
    assert res.format == "fake-quant"
    meta = json.loads((tmp_path / "q" / "llmq_quantization.json").read_text())
    assert meta["method"] == "gptq" and meta["config"]["bits"] == 4
    assert not list(tmp_path.glob(".*llmq-resume*"))  # resume dir removed on success


def test_indivisible_layers_error_or_skip(tmp_path):
    src = make_tiny_llama(tmp_path / "m", hidden=64, inter=160)  # 160 % 64 != 0: down_proj only
    with pytest.raises(ShapeError, match="mlp.down_proj"):
        run_gptq(src, tmp_path / "q", group_size=64)
    res = run_gptq(src, tmp_path / "q2", group_size=32, skip_indivisible=True)
    assert not any("skip" in n for n in res.notes)
    res = run_gptq(src, tmp_path / "q3", group_size=64, skip_indivisible=True)
    assert any("model.layers.0.mlp.down_proj" in n for n in res.notes)
    a = open_source(src).read("model.layers.0.mlp.down_proj.weight")
    b = open_source(tmp_path / "q3").read("model.layers.0.mlp.down_proj.weight")
    assert torch.equal(a, b)


def test_ignore_and_only(tiny):
    reader = open_source(tiny)
    plan = make_plan(reader, GPTQConfig(format="fake-quant", group_size=32, ignore=("*.mlp.*",)))
    assert all(not t.startswith("mlp.") for blk in plan.targets for t in blk)
    plan = make_plan(reader, GPTQConfig(format="fake-quant", group_size=32, only=("model.layers.1.*",)))
    assert plan.targets[0] == [] and len(plan.targets[1]) == 7
    with pytest.raises(BadInput, match="no Linear"):
        make_plan(reader, GPTQConfig(format="fake-quant", group_size=32, only=("nothing",)))


def test_bad_calibration_and_output_checks(tiny, tmp_path):
    config = GPTQConfig(format="fake-quant", group_size=32)
    with pytest.raises(CalibrationError):
        quantize_blockwise(tiny, tmp_path / "q", config, GPTQBlockMethod(config), "gptq",
                           samples=torch.zeros(0, 0, dtype=torch.long))  # fmt: skip
    with pytest.raises(CalibrationError, match="too short"):
        quantize_blockwise(tiny, tmp_path / "q", config, GPTQBlockMethod(config), "gptq",
                           samples=torch.zeros(4, 3, dtype=torch.long))  # fmt: skip
    with pytest.raises(CalibrationError, match="vocabulary"):
        quantize_blockwise(tiny, tmp_path / "q", config, GPTQBlockMethod(config), "gptq",
                           samples=torch.full((4, 16), 10_000))  # fmt: skip
    (tmp_path / "exists").mkdir()
    with pytest.raises(OutputExists):
        run_gptq(tiny, tmp_path / "exists")
    assert not (tmp_path / "q").exists()


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("float_target", [0.0, 1.0])
def test_resume_skips_finished_blocks(tmp_path, float_target):
    src = make_tiny_llama(tmp_path / "m", layers=3)
    config = GPTQConfig(format="fake-quant", group_size=32, nsamples=8, seqlen=32, float_target=float_target)
    seen: list[str] = []

    def stop_after_first_block(stage, done, total):
        seen.append(stage)
        if stage.startswith("block 2/"):
            raise Interrupt

    with pytest.raises(Interrupt):
        quantize_blockwise(src, tmp_path / "q", config, GPTQBlockMethod(config), "gptq", samples=samples(),
                           progress=stop_after_first_block)  # fmt: skip
    assert not (tmp_path / "q").exists() and list(tmp_path.glob(".q.llmq-resume/block_*"))
    resumed = GPTQConfig(
        format="fake-quant", group_size=32, nsamples=8, seqlen=32, resume=True, float_target=float_target
    )
    stages: list[str] = []
    res = quantize_blockwise(src, tmp_path / "q", resumed, GPTQBlockMethod(resumed), "gptq", samples=samples(),
                             progress=lambda s, d, t: stages.append(s))  # fmt: skip
    assert any("resumed after block 1" in n for n in res.notes)
    assert [s for s in stages if s.startswith("block")] == ["block 3/3"]
    quantize_blockwise(src, tmp_path / "ref", config, GPTQBlockMethod(config), "gptq", samples=samples())
    a, b = open_source(tmp_path / "q"), open_source(tmp_path / "ref")
    for name in a.names():
        assert torch.equal(a.read(name), b.read(name)), name


def _save_tokenizer(path: Path, vocab: int = 256) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(["def quantize(weight): return round(weight / scale) * scale"] * 20, trainer)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(path)


def test_plugin_run_with_builtin_calibration_and_bad_text(tmp_path):
    from llmq.quant.blockwise.gptq import GPTQQuantizer

    src = make_tiny_llama(tmp_path / "m", layers=1)
    _save_tokenizer(src)
    cfg = GPTQConfig(format="gptq", group_size=32, nsamples=4, seqlen=32, calibration="pydocs")
    stages: list[str] = []
    res = GPTQQuantizer().run(src, tmp_path / "q", cfg, progress=lambda s, d, t: stages.append(s))
    assert res.output_bytes > 0 and "block 1/1" in stages
    assert (tmp_path / "q" / "tokenizer.json").is_file()
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    bad = GPTQConfig(format="gptq", group_size=32, nsamples=4, seqlen=32, calibration=str(empty))
    with pytest.raises((CalibrationError, BadInput)):
        GPTQQuantizer().run(src, tmp_path / "q2", bad)
    assert not (tmp_path / "q2").exists()


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_staged_forward_equals_one_forward_per_group(tiny, tmp_path, monkeypatch):
    import llmq.quant.blockwise.pipeline as seq

    monkeypatch.setattr(seq, "BATCH_TOKENS", 64)  # 4 batches of 2 samples: several paused forwards
    calls = []
    real = seq.BlockContext.run_staged
    monkeypatch.setattr(seq.BlockContext, "run_staged", lambda self, *a: calls.append(1) or real(self, *a))
    run_gptq(tiny, tmp_path / "staged", act_order=True)
    assert len(calls) == 2  # both blocks went through the single staged forward
    monkeypatch.setattr(seq, "staged_forward_fits", lambda ctx: False)  # as when the activations do not fit
    run_gptq(tiny, tmp_path / "grouped", act_order=True)
    assert len(calls) == 2
    a, b = _tensors(tmp_path / "staged"), _tensors(tmp_path / "grouped")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_staged_forward_memory_guard(tiny, monkeypatch):
    import llmq.quant.blockwise.pipeline as seq

    reader = open_source(tiny)
    hf, model = seq._skeleton(tiny)
    hidden, kwargs = seq.capture_first_inputs(model, reader, samples())
    layer = model.model.layers[0]
    seq.materialize(layer, reader, "model.layers.0.")
    ctx = seq.BlockContext(0, "model.layers.0.", layer, ARCHES["llama"], [], hidden, kwargs, [])
    # 8 x 32 tokens x (2 x 64 + 64 + 32 + 32 + 64 + 128 + 128 + 64) floats x 4 bytes = 655360 bytes
    monkeypatch.setattr(seq, "free_memory", lambda device: 2 * 655360)
    assert seq.staged_forward_fits(ctx)
    monkeypatch.setattr(seq, "free_memory", lambda device: 2 * 655360 - 1)
    assert not seq.staged_forward_fits(ctx)
    reader.close()


def test_run_staged_order_and_errors(tiny):
    import threading

    import llmq.quant.blockwise.pipeline as seq

    reader = open_source(tiny)
    hf, model = seq._skeleton(tiny)
    torch.set_grad_enabled(False)
    hidden, kwargs = seq.capture_first_inputs(model, reader, samples())
    hidden = [h for x in hidden for h in x.split(2)]  # 4 batches
    kwargs = [
        kwargs[0] | {k: v[:2] for k, v in kwargs[0].items() if k == "attention_mask" and v is not None}
    ] * 4
    layer = model.model.layers[0]
    seq.materialize(layer, reader, "model.layers.0.")
    ctx = seq.BlockContext(0, "model.layers.0.", layer, ARCHES["llama"], [], hidden, kwargs, [])
    before = threading.active_count()
    ref = seq.forward_all(ctx)
    seen: list[tuple[int, tuple]] = []
    points = ["self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"]
    out = ctx.run_staged(points, lambda k, b, x: seen.append((k, b)), lambda k: None)
    assert seen == [(k, b) for k in range(4) for b in range(4)]  # all batches reach a point together
    assert all(torch.equal(a, b) for a, b in zip(out, ref, strict=True))
    with pytest.raises(RuntimeError, match="expected to reach 'mlp.down_proj' next, reached 'mlp.gate_proj'"):
        ctx.run_staged(
            ["self_attn.q_proj", "mlp.down_proj", "mlp.gate_proj"], lambda k, b, x: None, lambda k: None
        )

    def boom(k):
        if k == 1:
            raise ValueError("quantization failed")

    with pytest.raises(ValueError, match="quantization failed"):
        ctx.run_staged(points, lambda k, b, x: None, boom)
    assert threading.active_count() == before  # paused forwards were unwound, no thread left behind
    reader.close()
