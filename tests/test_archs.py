"""The architecture registry and plan-time validation: a broken config.json, GGUF metadata or tensor set is one
exit-2 line naming the file and the key or tensor, before anything is written (issue 15), for every command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from llmq.archs import FAMILIES, for_gguf, for_hf, lookup
from llmq.cli.app import main
from tests.helpers import make_tiny_model


def run(*argv: str) -> int:
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    return int(e.value.code or 0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("m") / "llama", "llama", hidden=64, layers=2, heads=4,
                           kv_heads=2, ffn=128, vocab=320, shards=1)  # fmt: skip


def mutated(tiny: Path, tmp: Path, change) -> Path:
    d = tmp / "bad"
    shutil.copytree(tiny, d)
    cfg = json.loads((d / "config.json").read_text())
    change(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def drop_tensor(tiny: Path, tmp: Path, name: str) -> Path:
    from safetensors.numpy import load_file, save_file

    d = tmp / "bad"
    shutil.copytree(tiny, d)
    f = d / "model.safetensors"
    tensors = load_file(f)
    del tensors[name]
    save_file(tensors, f, metadata={"format": "pt"})
    return d


def check_refused(capsys, argv: list[str], out: Path, *needles: str) -> None:
    code = run(*argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))


CONFIG_CASES = {
    "ctx-string": (lambda c: c.update(max_position_embeddings="big"), "max_position_embeddings"),
    "rope-scaling-string": (lambda c: c.update(rope_scaling="linear"), "rope_scaling"),
    "no-intermediate": (lambda c: c.pop("intermediate_size"), "intermediate_size is missing"),
    "no-heads": (lambda c: c.pop("num_attention_heads"), "num_attention_heads is missing"),
    "zero-heads": (lambda c: c.update(num_attention_heads=0), "num_attention_heads = 0"),
    "kv-heads-negative": (lambda c: c.update(num_key_value_heads=-1), "num_key_value_heads"),
    "kv-not-dividing": (lambda c: c.update(num_key_value_heads=3), "num_key_value_heads = 3"),
    "zero-hidden": (lambda c: c.update(hidden_size=0), "hidden_size"),
    "bos-string": (lambda c: c.update(bos_token_id="1"), "bos_token_id"),
    "layers-100": (lambda c: c.update(num_hidden_layers=100), "model.layers.2"),
    "layers-1": (lambda c: c.update(num_hidden_layers=1), "model.layers.1"),
    "wrong-ffn": (lambda c: c.update(intermediate_size=96), "[64, 96]"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config_refused_by_convert(tiny, tmp_path, capsys, case):
    change, needle = CONFIG_CASES[case]
    src = mutated(tiny, tmp_path, change)
    out = tmp_path / "out.gguf"
    check_refused(capsys, ["convert", str(src), str(out)], out, "bad", needle)


@pytest.mark.parametrize("dropped", ["model.layers.1.self_attn.q_proj.weight", "lm_head.weight",
                                     "model.layers.0.post_attention_layernorm.weight"])  # fmt: skip
def test_dropped_tensor_refused(tiny, tmp_path, capsys, dropped):
    src = drop_tensor(tiny, tmp_path, dropped)
    out = tmp_path / "out.gguf"
    check_refused(capsys, ["convert", str(src), str(out)], out, dropped, "missing")


@pytest.mark.parametrize("method", ["gguf", "gptq", "awq"])
def test_quantize_plans_validate(tiny, tmp_path, capsys, method):
    src = drop_tensor(tiny, tmp_path, "model.layers.1.self_attn.q_proj.weight")
    out = tmp_path / "q"
    argv = ["quantize", str(src), "-o", str(out), "--method", method]
    if method == "gguf":
        argv += ["--type", "Q8_0"]
    check_refused(capsys, argv, out, "q_proj", "missing")


def test_estimate_validates_config(tiny, tmp_path, capsys):
    src = mutated(tiny, tmp_path, lambda c: c.update(num_attention_heads=0))
    assert run("estimate", "memory", str(src)) == 2
    assert "num_attention_heads" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ GGUF metadata


def write_gguf(path: Path, kv: dict, tensors: dict[str, np.ndarray]) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    for key, (value, vtype) in kv.items():
        w.add_key_value(key, value, vtype)
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def gguf_model(path: Path, kv_change=None, tensor_change=None) -> Path:
    import gguf

    from tests.gguf_helpers import tiny_llama_tensors

    V = gguf.GGUFValueType
    kv = {
        "llama.block_count": (1, V.UINT32), "llama.context_length": (256, V.UINT32),
        "llama.embedding_length": (64, V.UINT32), "llama.feed_forward_length": (128, V.UINT32),
        "llama.attention.head_count": (4, V.UINT32), "llama.attention.head_count_kv": (2, V.UINT32),
        "llama.attention.layer_norm_rms_epsilon": (1e-5, V.FLOAT32), "llama.rope.dimension_count": (16, V.UINT32),
        "llama.vocab_size": (64, V.UINT32), "tokenizer.ggml.bos_token_id": (1, V.UINT32),
    }  # fmt: skip
    tensors = tiny_llama_tensors(hidden=64, n_layers=1, ff=128, vocab=64, outliers=False)
    if kv_change:
        kv_change(kv, V)
    if tensor_change:
        tensor_change(tensors)
    return write_gguf(path, kv, tensors)


GGUF_CASES = {
    "kv-heads-minus-1": (lambda kv, V: kv.update({"llama.attention.head_count_kv": (-1, V.INT32)}), None,
                         "llama.attention.head_count_kv"),
    "heads-0": (lambda kv, V: kv.update({"llama.attention.head_count": (0, V.UINT32)}), None,
                "llama.attention.head_count = 0"),
    "bos-string": (lambda kv, V: kv.update({"tokenizer.ggml.bos_token_id": ("1", V.STRING)}), None,
                   "tokenizer.ggml.bos_token_id"),
    "no-ffn": (lambda kv, V: kv.pop("llama.feed_forward_length"), None, "llama.feed_forward_length is missing"),
    "layers-100": (lambda kv, V: kv.update({"llama.block_count": (100, V.UINT32)}), None, "blk.1."),
    "zero-dim": (None, lambda t: t.update({"blk.0.attn_norm.weight": np.zeros((0,), np.float32)}),
                 "blk.0.attn_norm.weight"),
    "dropped-q": (None, lambda t: t.pop("blk.0.attn_q.weight"), "blk.0.attn_q.weight is missing"),
    "embedded-config-no-heads": (
        lambda kv, V: kv.update({"llmq.hf_config": (json.dumps({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 1, "vocab_size": 64}), V.STRING)}),
        None, "num_attention_heads is missing"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(GGUF_CASES))
def test_bad_gguf_metadata_refused_by_convert(tmp_path, capsys, case):
    kv_change, tensor_change, needle = GGUF_CASES[case]
    src = gguf_model(tmp_path / "bad.gguf", kv_change, tensor_change)
    out = tmp_path / "out-hf"
    check_refused(capsys, ["convert", str(src), str(out)], out, "bad.gguf", needle)


def test_unmutated_gguf_passes_validation(tmp_path):
    # the builder above makes a valid model: the refusals come from the mutations alone
    from dataclasses import replace

    from llmq.archs.validate import check_gguf_kv, check_hf_config, check_tensors
    from llmq.conversion import gguf_config
    from llmq.io import GGUFReader

    src = gguf_model(tmp_path / "ok.gguf")
    with GGUFReader(src) as r:
        fam = for_gguf(r.arch)
        check_gguf_kv(fam, r.metadata, src.name)
        dims = check_hf_config(gguf_config(r, fam, "float32"), fam, src.name)
        check_tensors(fam, replace(dims, vocab=None), {t.name: t.shape for t in r.infos()}, src.name)
    assert (dims.layers, dims.heads, dims.kv_heads, dims.head_dim) == (1, 4, 2, 16)


@pytest.mark.parametrize("case", ["kv-heads-minus-1", "heads-0", "bos-string"])
def test_bad_gguf_metadata_refused_by_quantize_and_estimate(tmp_path, capsys, case):
    kv_change, tensor_change, needle = GGUF_CASES[case]
    src = gguf_model(tmp_path / "bad.gguf", kv_change, tensor_change)
    out = tmp_path / "q.gguf"
    check_refused(capsys, ["quantize", str(src), "-o", str(out), "--method", "gguf", "--type", "Q8_0"], out,
                  needle)  # fmt: skip
    assert run("estimate", "memory", str(src)) == 2
    assert needle in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ registry


def test_registry_lookups():
    assert for_hf({"architectures": ["MistralForCausalLM"]}).name == "llama"
    assert for_hf({"model_type": "qwen3"}).name == "qwen3"
    assert lookup({"model_type": "gpt2"}) is None
    assert for_gguf("gemma2").swa_period == 2
    for name, fam in FAMILIES.items():
        assert fam.gguf_arch == name and fam.model_types and fam.hf_class in fam.hf_classes
        # every name maps back: HF -> GGUF -> HF is the identity on the family's table
        for hf in fam.tensors:
            n = hf.format(bid=7)
            g = fam.hf_to_gguf_name(n)
            if g is not None:
                assert fam.gguf_to_hf_name(g) == n


def test_gemma3_sparse_text_config_gets_the_defaults():
    """google/gemma-3-4b-it's config.json lists only what differs from Gemma3TextConfig: the metadata is what
    convert_hf_to_gguf.py writes for it (8 heads, 4 kv heads, head_dim 256, two rope bases, linear x8)."""
    from llmq.archs.validate import check_hf_config
    from llmq.conversion import hf_metadata

    cfg = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
           "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                           "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                           "sliding_window": 1024}}  # fmt: skip
    fam = for_hf(cfg)
    text = fam.source_config(cfg)
    dims = check_hf_config(text, fam, "config.json")
    assert (dims.heads, dims.kv_heads, dims.head_dim, dims.vocab) == (8, 4, 256, 262208)
    kv = {k: v for k, v, _ in hf_metadata(fam, text, "g", 1)}
    assert kv["gemma3.rope.freq_base"] == 1e6 and kv["gemma3.rope.freq_base_swa"] == 1e4
    assert kv["gemma3.rope.scaling.factor"] == 8.0 and kv["gemma3.attention.sliding_window"] == 1024
    assert (
        fam.source_name("language_model.model.layers.3.mlp.up_proj.weight")
        == "model.layers.3.mlp.up_proj.weight"
    )
    assert fam.hf_to_gguf_name("model.vision_tower.vision_model.embeddings.patch_embedding.weight") is None


def test_edited_kvs_disagreeing_with_embedded_config_refused(tiny, tmp_path, capsys):
    """A GGUF llmq wrote, whose llama.cpp keys were edited afterwards, is refused rather than converted back from
    the (now different) embedded config."""
    import gguf

    from llmq.conversion import convert

    good = tmp_path / "good.gguf"
    convert(tiny, good, "f32")
    r = gguf.GGUFReader(str(good))
    w = gguf.GGUFWriter(str(tmp_path / "bad.gguf"), "llama")
    for field in r.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value = field.contents()
        if field.name == "llama.attention.head_count":
            value = 8
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(field.name, value, vtype, sub_type=sub)
    for t in r.tensors:
        w.add_tensor(
            t.name, np.asarray(t.data), raw_shape=list(reversed(t.shape.tolist())), raw_dtype=t.tensor_type
        )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out = tmp_path / "back"
    check_refused(capsys, ["convert", str(tmp_path / "bad.gguf"), str(out)], out, "llama.attention.head_count = 8",
                  "disagrees")  # fmt: skip
