"""safetensors ⇄ GGUF conversion: names, permutation, types, round trips, and the reference consumers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llmq.archs import FAMILIES, permute_qk, unpermute_qk
from llmq.conversion import convert
from llmq.convert_rows import encode
from llmq.errors import BadInput, OutputExists, UnsupportedArchitecture
from llmq.io import open_checkpoint
from llmq.io.rows import from_float32
from tests.helpers import make_tiny_model

REPO = Path(__file__).resolve().parents[1]


def _llama_logits(gguf_path: Path, tokens: list[int]) -> np.ndarray:
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(str(gguf_path), n_ctx=max(64, len(tokens)), n_batch=512, logits_all=True,
                          verbose=False, n_threads=2, seed=0)  # fmt: skip
    llm.eval(tokens)
    out = np.array(llm.scores[: len(tokens)], dtype=np.float32)
    llm.close()
    return out


def _hf_logits(hf_dir: Path, tokens: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.inference_mode():
        return model(torch.tensor([tokens])).logits[0].float().numpy()


def test_names_agree_with_gguf_py():
    import gguf

    for arch_name, arch in FAMILIES.items():
        tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch_name.upper()], 4)
        for hf in arch.tensors:
            name = hf.format(bid=3)
            ours = arch.hf_to_gguf_name(name)
            base, _, suffix = name.rpartition(".")
            theirs = tmap.get_name(base)
            # gguf-py lacks the tensor for the arch (q_norm on llama), or llmq drops it (a tied lm_head)
            if theirs is None or ours is None:
                continue
            assert ours == f"{theirs}.{suffix}", name


def test_permutation_inverts():
    w = np.arange(6 * 8 * 4, dtype=np.float32).reshape(48, 4)
    assert np.array_equal(unpermute_qk(permute_qk(w, 3), 3), w)
    assert not np.array_equal(permute_qk(w, 3), w)


def test_round_trip_hf_gguf_hf_is_bit_identical(tiny_llama, tmp_path):
    gg = tmp_path / "m.gguf"
    r = convert(tiny_llama, gg, "f32")
    assert r.direction == "hf->gguf" and r.types == {"F32": r.n_tensors}
    back = convert(gg, tmp_path / "back")
    assert back.outtype == "f32"
    src, dst = open_checkpoint(tiny_llama), open_checkpoint(tmp_path / "back")
    assert set(src.names()) == set(dst.names())
    for name in src.names():
        assert np.array_equal(src.read_raw(name), dst.read_raw(name)), name
    cfg_src = json.loads((tiny_llama / "config.json").read_text())
    cfg_dst = json.loads((tmp_path / "back" / "config.json").read_text())
    assert {k: v for k, v in cfg_dst.items() if k != "dtype"} == {
        k: v for k, v in cfg_src.items() if k != "dtype"
    }


def test_bf16_odd_shapes_round_trip_and_sharding(tiny_llama_odd, tmp_path):
    gg = tmp_path / "m.gguf"
    r = convert(tiny_llama_odd, gg)  # auto picks bf16 from the checkpoint
    assert r.outtype == "bf16"
    back = convert(gg, tmp_path / "back", max_shard_size="1MB")
    assert back.outtype == "bf16" and len(back.files) > 1
    assert (tmp_path / "back" / "model.safetensors.index.json").exists()
    src, dst = open_checkpoint(tiny_llama_odd), open_checkpoint(tmp_path / "back")
    for name in src.names():
        assert np.array_equal(src.read_raw(name), dst.read_raw(name)), name


def test_outtypes_match_reference_encoders(tiny_llama, tmp_path):
    import gguf

    src = open_checkpoint(tiny_llama)
    n_head = json.loads((tiny_llama / "config.json").read_text())["num_attention_heads"]
    q = permute_qk(src.read_float("model.layers.0.self_attn.q_proj.weight"), n_head)
    for outtype, qtype in (("f16", "F16"), ("bf16", "BF16"), ("q8_0", "Q8_0")):
        gg = tmp_path / f"{outtype}.gguf"
        convert(tiny_llama, gg, outtype)
        r = open_checkpoint(gg)
        assert r.metadata["general.file_type"] == {"f16": 1, "bf16": 32, "q8_0": 7}[outtype]
        info = r.info("blk.0.attn_q.weight")
        assert info.dtype == qtype
        assert r.info("blk.0.attn_norm.weight").dtype == "F32"
        want = gguf.quants.quantize(q, gguf.GGMLQuantizationType[qtype])
        assert np.array_equal(r.read_raw("blk.0.attn_q.weight").reshape(-1).view(np.uint8),
                              np.asarray(want).reshape(-1).view(np.uint8))  # fmt: skip


def test_bf16_to_f16_table_is_the_exact_cast():
    from llmq.convert_rows import bf16_to_f16_table
    from llmq.io.rows import to_float32

    bits = np.arange(1 << 16, dtype=np.uint16)
    with np.errstate(over="ignore"):
        want = to_float32(bits, "BF16").astype(np.float16).view(np.uint16)
    got = bf16_to_f16_table()[bits]
    nan = np.isnan(to_float32(bits, "BF16"))
    assert np.array_equal(got[~nan], want[~nan]) and np.isnan(got[nan].view(np.float16)).all()


def test_encoders_on_edge_values():
    import gguf

    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 64)).astype(np.float32) * np.float32(1e3)
    x[0, :32] = 0
    x[1, 5] = np.float32(0.49999997)
    x[2] = np.float32(3.4e38)
    x[3, 0] = np.nan
    assert np.array_equal(encode(x[:3], "Q8_0"), gguf.quants.quantize(x[:3], gguf.GGMLQuantizationType.Q8_0))
    want = gguf.quants.quantize(x, gguf.GGMLQuantizationType.BF16)
    assert np.array_equal(from_float32(x, "BF16").view(np.uint8).reshape(want.shape), want)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"])
def test_gguf_from_hf_runs_in_llama_cpp_like_transformers(arch, tmp_path):
    pytest.importorskip("llama_cpp")
    hf = make_tiny_model(tmp_path / arch, arch=arch, hidden=128, heads=4, kv_heads=2, ffn=256, shards=1)
    gg = tmp_path / f"{arch}.gguf"
    convert(hf, gg, "f32")
    tokens = list(range(3, 67))
    a, b = _llama_logits(gg, tokens), _hf_logits(hf, tokens)
    assert np.abs(a - b).max() < 2e-3 * max(1.0, np.abs(b).max())
    assert (a.argmax(-1) == b.argmax(-1)).all()
    back = convert(gg, tmp_path / f"{arch}-back")  # and back to HF: the same model for transformers
    c = _hf_logits(tmp_path / f"{arch}-back", tokens)
    assert np.abs(c - b).max() < 1e-4 * max(1.0, np.abs(b).max()), back


def test_unknown_architecture_is_clear(tiny_llama, tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    for f in tiny_llama.iterdir():
        os.link(f, d / f.name)  # a hard link: a symlink out of the model directory is refused
    (d / "config.json").unlink()
    cfg = json.loads((tiny_llama / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["FancyNetForCausalLM"], "fancy"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitecture, match="FancyNet"):
        convert(d, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_refuses_overwrite_and_bad_outtype(tiny_llama, tmp_path):
    out = tmp_path / "x.gguf"
    out.write_bytes(b"keep")
    with pytest.raises(OutputExists):
        convert(tiny_llama, out)
    assert out.read_bytes() == b"keep"
    with pytest.raises(BadInput, match="outtype"):
        convert(tiny_llama, tmp_path / "y.gguf", "q4_k", force=True)
    assert not (tmp_path / "y.gguf").exists()


# ------------------------------------------------------------------------------------------------ SmolLM2


@pytest.fixture(scope="module")
def wiki_tokens(smollm2_gguf_path, wikitext) -> list[int]:
    llama_cpp = pytest.importorskip("llama_cpp")
    vocab = llama_cpp.Llama(str(smollm2_gguf_path), vocab_only=True, verbose=False)
    return vocab.tokenize(wikitext[:3000].encode(), add_bos=False, special=False)[:200]


def test_smollm2_gguf_to_hf_matches_transformers_gguf_loader(smollm2_hf, smollm2_gguf_path, wiki_tokens):
    import torch
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(smollm2_gguf_path.parent, gguf_file=smollm2_gguf_path.name,
                                               dtype=torch.float32)  # fmt: skip
    with torch.inference_mode():
        want = ref(torch.tensor([wiki_tokens])).logits[0].numpy()
    got = _hf_logits(smollm2_hf, wiki_tokens)
    assert np.abs(got - want).max() < 1e-4


def test_smollm2_hf_to_gguf_in_llama_cpp_matches_transformers(smollm2_hf, tmp_path, wiki_tokens):
    gg = tmp_path / "smollm2-f32.gguf"
    convert(smollm2_hf, gg, "f32")
    a, b = _llama_logits(gg, wiki_tokens), _hf_logits(smollm2_hf, wiki_tokens)
    assert (a.argmax(-1) == b.argmax(-1)).mean() == 1.0
    assert np.abs(a - b).max() < 0.05


def test_smollm2_tokenizer_matches_llama_cpp(smollm2_hf, smollm2_gguf_path, wikitext):
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_hf)
    vocab = llama_cpp.Llama(str(smollm2_gguf_path), vocab_only=True, verbose=False)
    text = wikitext[:200_000]
    assert tok(text, add_special_tokens=False)["input_ids"] == vocab.tokenize(text.encode(), add_bos=False)


def test_streaming_peak_rss(tmp_path):
    """A 2.2 GB f32 checkpoint converts to f16 GGUF with peak RSS below its largest tensor + 300 MB."""
    script = REPO / "benchmarks" / "make_synthetic.py"
    src = tmp_path / "big"
    subprocess.run([sys.executable, str(script), str(src), "--hidden", "2048", "--ffn", "8192", "--layers", "9",
                    "--vocab", "512", "--dtype", "float32"], check=True, cwd=REPO)  # fmt: skip
    largest = max(t.nbytes for t in open_checkpoint(src).infos())
    total = sum(t.nbytes for t in open_checkpoint(src).infos())
    assert total > 2e9
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child of this (big) pytest process
    # would report the parent's high-water mark
    code = (
        "from llmq.conversion import convert\n"
        f"convert({str(src)!r}, {str(tmp_path / 'big.gguf')!r}, 'f16')\n"
        "hwm = [ln for ln in open('/proc/self/status') if ln.startswith('VmHWM')][0]\n"
        "print(int(hwm.split()[1]) * 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    peak = int(out.stdout.strip().splitlines()[-1])
    assert peak < largest + 300 * 2**20, (
        f"peak RSS {peak / 2**20:.0f} MiB, largest tensor {largest / 2**20:.0f} MiB"
    )
    assert (tmp_path / "big.gguf").stat().st_size > total // 2


def test_pickle_checkpoint_only_with_opt_in(tiny_llama, tmp_path):
    import torch

    d = tmp_path / "pt"
    d.mkdir()
    src = open_checkpoint(tiny_llama)
    torch.save({n: src.read(n) for n in src.names()}, d / "pytorch_model.bin")
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (d / f).write_bytes((tiny_llama / f).read_bytes())
    from llmq.errors import UnsafeCheckpoint

    with pytest.raises(UnsafeCheckpoint, match="--allow-pickle"):
        convert(d, tmp_path / "x.gguf")
    convert(d, tmp_path / "x.gguf", "f32", allow_pickle=True)
    convert(tiny_llama, tmp_path / "y.gguf", "f32")
    a, b = open_checkpoint(tmp_path / "x.gguf"), open_checkpoint(tmp_path / "y.gguf")
    for n in a.names():
        assert np.array_equal(a.read_raw(n), b.read_raw(n))
