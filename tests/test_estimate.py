"""Unit tests of the estimator's rules: format sizes, KV layouts per engine, solvers, catalog, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmq.errors import BadInput, UnsupportedType
from llmq.estimate import kv, quants
from llmq.estimate.arch import FULL, RECURRENT, SWA, from_config
from llmq.estimate.hardware import CATALOG, GiB, get_gpu
from llmq.estimate.memory import EstimateConfig, estimate_memory

REPO = Path(__file__).resolve().parents[1]

LLAMA = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
         "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
         "torch_dtype": "bfloat16", "rms_norm_eps": 1e-5}  # fmt: skip


def _cfg(tmp_path: Path, **over) -> str:
    p = tmp_path / "config.json"
    p.write_text(json.dumps({**LLAMA, **over}))
    return str(p)


def _term(result, name: str) -> int:
    return sum(t.nbytes for t in result.terms if t.name == name)


# ------------------------------------------------------------------------------------------ formats


def test_parse_quant() -> None:
    assert quants.parse_quant("Q4_K_M").family == "gguf"
    s = quants.parse_quant("gptq3-g64-act")
    assert (s.family, s.bits, s.group_size, s.act_order) == ("gptq", 3, 64, True)
    assert quants.parse_quant("rtn8-gchannel").group_size == -1
    assert quants.parse_quant("w4a16").family == "ct"
    assert quants.parse_quant("nf4-dq-b128").blocksize == 128
    for bad in ("awq3", "q4_k_x", "gptq4-g100", "nf4-b7", "ct3"):
        with pytest.raises(BadInput):
            quants.parse_quant(bad)


def test_linear_format_sizes_by_hand() -> None:
    out, inp, g = 4096, 4096, 32  # 128-column groups
    gptq = quants.linear_bytes(quants.parse_quant("gptq4-g128"), out, inp, "BF16")
    # qweight int32 [in/8, out] + qzeros int32 [g, out/8] + scales fp16 [g, out] + g_idx int32 [in]
    assert gptq == inp // 8 * out * 4 + g * out // 8 * 4 + g * out * 2 + inp * 4
    awq = quants.linear_bytes(quants.parse_quant("awq4"), out, inp, "BF16")
    assert awq == inp * out // 8 * 4 + g * out // 8 * 4 + g * out * 2
    ct = quants.linear_bytes(quants.parse_quant("ct4"), out, inp, "BF16")
    assert ct == out * inp // 8 * 4 + out * g * 2 + 16  # weight_packed + weight_scale + weight_shape
    ct_asym = quants.linear_bytes(quants.parse_quant("ct4-asym"), out, inp, "BF16")
    assert ct_asym - ct == out // 8 * g * 4  # packed zero points
    gptq3 = quants.linear_bytes(quants.parse_quant("gptq3"), out, inp, "F16")
    assert gptq3 == inp * 3 // 32 * out * 4 + g * out * 3 // 32 * 4 + g * out * 2 + inp * 4
    assert quants.linear_bytes(quants.parse_quant("int8"), out, inp, "F16") == out * inp + 4 * out
    with pytest.raises(UnsupportedType):
        quants.linear_bytes(quants.parse_quant("awq4"), 100, 4096, "F16")


def test_quantized_model_keeps_embeddings_norms_and_head(tmp_path: Path) -> None:
    est = estimate_memory(EstimateConfig(_cfg(tmp_path), quants=("gptq4", "nf4"), engine="transformers"))
    for r in est.results:
        # per layer 7 Linear weights quantized; embeddings, lm_head, 2 norms/layer and the final norm kept
        assert r.n_quantized == 32 * 7 and r.n_kept == 2 + 32 * 2 + 1
        assert r.kept_bytes >= 2 * 128256 * 4096 * 2
    gptq = est.results[0]
    assert 4.0 < 8 * gptq.quantized_bytes / (gptq.params_total - 2 * 128256 * 4096 - 65 * 4096) < 4.3


def test_cache_type_table_matches_ggml() -> None:
    from llmq.io.ggml_types import GGML_TYPES

    for name, ggml in kv.GGML_CACHE_NAMES.items():
        assert kv.CACHE_TYPES[name] == GGML_TYPES[ggml][1:]


# ------------------------------------------------------------------------------------------ KV cache


def test_gqa_kv_per_token_and_dtype(tmp_path: Path) -> None:
    est = estimate_memory(EstimateConfig(_cfg(tmp_path), context=8192, engine="transformers"))
    r = est.results[0]
    assert r.kv_per_token_bytes == 32 * 2 * 8 * 128 * 2  # layers × (K,V) × kv heads × head_dim × bf16
    assert _term(r, "KV cache K") == _term(r, "KV cache V") == 32 * 8 * 128 * 2 * 8192
    est8 = estimate_memory(EstimateConfig(_cfg(tmp_path), context=8192, engine="vllm", kv_cache_dtype="fp8"))
    assert _term(est8.results[0], "KV cache K") == 32 * 8 * 128 * 8192


def test_explicit_head_dim(tmp_path: Path) -> None:
    a = from_config({**LLAMA, "head_dim": 256})
    assert a.kv_elements_per_token(0) == (8 * 256, 8 * 256)


def test_vllm_blocks_and_kv_head_replication(tmp_path: Path) -> None:
    a = from_config({**LLAMA, "num_key_value_heads": 2})
    one = kv.kv_layout(a, "vllm", 17, 1, "bf16", "bf16")
    assert one.cells == 32  # two blocks of 16
    per_rank = {tp: kv.kv_layout(a, "vllm", 1024, 1, "bf16", "bf16", tp=tp).total for tp in (1, 2, 4, 8)}
    assert per_rank[2] == per_rank[1] // 2
    assert per_rank[4] == per_rank[8] == per_rank[2]  # one head per rank: replicated beyond 2 ranks
    assert "replicated" in kv.kv_layout(a, "vllm", 1024, 1, "bf16", "bf16", tp=8).formula


def test_mla_latent_no_v_replicated_across_tp() -> None:
    a = from_config({**LLAMA, "model_type": "deepseek_v3", "kv_lora_rank": 512, "qk_rope_head_dim": 64,
                     "qk_nope_head_dim": 128, "v_head_dim": 128, "num_key_value_heads": 128,
                     "num_attention_heads": 128})  # fmt: skip
    lay1 = kv.kv_layout(a, "vllm", 1024, 1, "bf16", "bf16", tp=1)
    lay8 = kv.kv_layout(a, "vllm", 1024, 1, "bf16", "bf16", tp=8)
    assert lay1.v_bytes == 0 and lay1.k_bytes == 32 * (512 + 64) * 2 * 1024
    assert lay8.total == lay1.total


def test_sliding_window_layers() -> None:
    mistral = from_config({**LLAMA, "model_type": "mistral", "sliding_window": 4096})
    assert set(mistral.layer_kinds) == {SWA}
    lay = kv.kv_layout(mistral, "transformers", 32768, 1, "bf16", "bf16")
    assert lay.k_bytes == 32 * 8 * 128 * 2 * 4096
    gemma2 = from_config({**LLAMA, "model_type": "gemma2", "sliding_window": 4096, "num_hidden_layers": 4})
    assert gemma2.layer_kinds == [SWA, FULL, SWA, FULL]
    gemma3 = from_config(
        {**LLAMA, "model_type": "gemma3_text", "sliding_window": 1024, "num_hidden_layers": 12}
    )
    assert gemma3.layer_kinds.count(FULL) == 2 and gemma3.layer_kinds[5] == FULL
    oss = from_config({**LLAMA, "model_type": "gpt_oss", "sliding_window": 128, "num_hidden_layers": 4,
                       "layer_types": ["sliding_attention", "full_attention"] * 2})  # fmt: skip
    assert oss.layer_kinds == [SWA, FULL, SWA, FULL]
    lcpp = kv.kv_layout(gemma2, "llama.cpp", 8192, 1, "f16", "f16", swa_full=False)
    assert lcpp.swa_cells == 4096 + 512  # pad256(4096 + n_ubatch 512)


def test_hybrid_recurrent_state() -> None:
    cfg = {**LLAMA, "model_type": "qwen3_next", "num_hidden_layers": 4,
           "layer_types": ["linear_attention", "linear_attention", "linear_attention", "full_attention"],
           "linear_num_key_heads": 16, "linear_num_value_heads": 32, "linear_key_head_dim": 128,
           "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4}  # fmt: skip
    a = from_config(cfg)
    assert a.layer_kinds.count(RECURRENT) == 3
    lay = kv.kv_layout(a, "llama.cpp", 4096, 2, "f16", "f16")
    conv = 3 * (2 * 16 * 128 + 32 * 128)
    ssm = 32 * 128 * 128
    assert lay.state_bytes == 3 * 2 * (conv + ssm) * 4  # f32 in llama.cpp
    assert lay.k_bytes == 1 * 8 * 128 * 2 * 4096 * 2  # one attention layer only


def test_engine_rejects_unsupported_cache_types(tmp_path: Path) -> None:
    with pytest.raises(BadInput):
        estimate_memory(EstimateConfig(_cfg(tmp_path), engine="vllm", kv_cache_dtype="q4_0"))
    with pytest.raises(BadInput):
        estimate_memory(EstimateConfig(_cfg(tmp_path), engine="transformers", kv_cache_dtype="fp8"))


# ------------------------------------------------------------------------------------------ solvers, catalog


def test_max_context_is_the_boundary(tmp_path: Path) -> None:
    from llmq.estimate.memory import _Planner, budget_of

    est = estimate_memory(EstimateConfig(_cfg(tmp_path), gpu="h100", engine="transformers", context=4096))
    r = est.results[0]
    assert r.fits and r.max_context and r.max_sequences
    a = from_config(LLAMA)
    plan = _Planner(EstimateConfig(_cfg(tmp_path), engine="transformers"), a, "transformers", r.weights_bytes, "",
                    "bf16", "bf16", get_gpu("h100"))  # fmt: skip
    budget = budget_of(get_gpu("h100"), "transformers", 0.9)
    assert plan.total(r.max_context, 1, 1) <= budget < plan.total(r.max_context + 1, 1, 1)
    assert plan.total(4096, r.max_sequences, 1) <= budget < plan.total(4096, r.max_sequences + 1, 1)


def test_fit_and_gpus_needed(tmp_path: Path) -> None:
    big = _cfg(
        tmp_path, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64
    )
    est = estimate_memory(EstimateConfig(big, gpu="rtx-4090", engine="vllm", fit=True, context=4096))
    names = [r.quant for r in est.results]
    assert names[0] == "bf16" and est.best_fit is None  # a 70B model fits no single 24 GiB card
    bf16 = est.results[0]
    assert bf16.gpus_needed in (8, 16) and not bf16.fits
    est80 = estimate_memory(EstimateConfig(big, gpu="h100", engine="vllm", fit=True, context=4096))
    # bf16 (141 GB) needs 2 ranks (65.7 GiB each); fp8 (70.6 GB = 65.7 GiB) fits 0.9 × 79.65 GiB with a 4k context
    assert est80.best_fit == "fp8" and est80.results[0].gpus_needed == 2


def test_roofline(tmp_path: Path) -> None:
    est = estimate_memory(EstimateConfig(_cfg(tmp_path), gpu="h100", engine="vllm", context=2048))
    p = est.results[0].perf
    n = est.results[0].params_total
    assert 2 * (n - 128256 * 4096) < p["flops_per_token"] < 2.1 * n
    assert 100 < p["crossover_batch"] < 400  # ~ 989e12/3.35e12 × (2 bytes / 2 FLOPs)
    assert p["decode_latency_s"] == pytest.approx(
        (est.results[0].active_weight_bytes + 32 * 2 * 8 * 128 * 2 * 2048) / 3.35e12
    )


def test_gpu_catalog() -> None:
    names = {g.name for g in CATALOG}
    for want in (
        "A100-40GB",
        "A100-80GB",
        "H100-80GB",
        "H200",
        "L4",
        "L40S",
        "RTX-3090",
        "RTX-4090",
        "RTX-5090",
    ):
        assert want in names
    assert any(g.unified for g in CATALOG)
    assert get_gpu("h100").memory_bytes / GiB == pytest.approx(79.65, abs=0.01)
    with pytest.raises(BadInput):
        get_gpu("tpu-v5")


# ------------------------------------------------------------------------------------------ GGUF targets


def test_gguf_targets_use_the_shared_mix(tiny_llama: Path) -> None:
    est = estimate_memory(EstimateConfig(str(tiny_llama), quants=("Q8_0", "Q4_K_M"), engine="llama.cpp"))
    src_n = sum(1 for _ in est.results[0].terms)
    assert src_n and est.results[0].weights_bytes > est.results[1].weights_bytes
    from llmq.io.ggml_types import type_nbytes

    assert type_nbytes("Q8_0", (256, 256)) == 256 * 8 * 34


def test_gguf_target_without_mix_is_a_clear_error(tiny_llama: Path) -> None:
    try:
        import llmq.quant.gguf.mix  # noqa: F401

        pytest.skip("gguf_mix is present")
    except ImportError:
        pass
    with pytest.raises(UnsupportedType, match="gguf_mix"):
        estimate_memory(EstimateConfig(str(tiny_llama), quants=("Q4_K_M",)))


# ------------------------------------------------------------------------------------------ CLI


def test_cli_json_and_table(tmp_path: Path) -> None:
    from llmq.cli.app import app

    runner = CliRunner()
    res = runner.invoke(app, ["estimate", "memory", _cfg(tmp_path), "-q", "bf16", "-q", "gptq4", "--gpu", "l40s",
                              "--engine", "vllm", "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert [r["quant"] for r in data["results"]] == ["bf16", "gptq4"]
    assert all(t["formula"] and t["kind"] for r in data["results"] for t in r["terms"])
    assert data["units"]["GiB"] == "2^30 B"
    res = runner.invoke(app, ["estimate", "memory", _cfg(tmp_path), "--gpu", "l40s"])
    assert res.exit_code == 0 and "GiB" in res.output and "Best that fits" in res.output
    res = runner.invoke(app, ["estimate", "memory", _cfg(tmp_path), "--fit"])
    assert res.exit_code != 0
    res = runner.invoke(app, ["estimate", "gpus"])
    assert res.exit_code == 0 and "H200" in res.output


def test_cli_imports_no_torch(tmp_path: Path) -> None:
    code = (
        "import sys\nfrom llmq.cli.app import main\n"
        f"try:\n    main(['estimate', 'memory', {_cfg(tmp_path)!r}, '--json', '-q', 'nf4', '-q', 'gptq4'])\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "print('HEAVY', bad, file=sys.stderr)\nsys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "HEAVY []" in proc.stderr


def test_requantizing_a_gguf_source(smollm2_gguf_path: Path) -> None:
    """Non-GGUF targets from a GGUF file: block-typed weights are re-quantized, the rest held in f16."""
    est = estimate_memory(
        EstimateConfig(str(smollm2_gguf_path), quants=("gptq4", "bf16"), engine="transformers")
    )
    gptq, bf16 = est.results
    assert gptq.n_quantized == 30 * 7  # q, k, v, o, gate, up, down of every block; token_embd and norms kept
    assert bf16.weights_bytes == bf16.params_total * 2


def test_config_round_trip_and_validation() -> None:
    cfg = EstimateConfig(
        "m", quants=("Q4_K_M", "gptq4"), context=2048, gpu="h100", engine="vllm", tp=2, num_gpus=2
    )
    assert EstimateConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    for bad in (
        {"engine": "tgi"},
        {"gpu": "h100", "vram_gib": 24.0},
        {"tp": 4},
        {"batch": 0},
        {"context": 0},
    ):
        with pytest.raises(BadInput):
            EstimateConfig("m", **bad)


def test_vllm_max_sequences_follows_the_block_pool(tmp_path: Path) -> None:
    est = estimate_memory(EstimateConfig(_cfg(tmp_path), gpu="l40s", engine="vllm", context=1000))
    r = est.results[0]
    fixed = sum(t.nbytes for t in r.terms if not t.name.startswith("KV"))
    per_seq = 32 * 2 * 8 * 128 * 2 * 1008  # 1000 tokens → 63 blocks of 16 per sequence
    assert r.max_sequences == (est.budget_bytes - fixed) // per_seq


@pytest.mark.parametrize("columns", [80, 200])
def test_cli_table_reads_well_in_80_columns(tmp_path: Path, columns: int) -> None:
    """No header or figure of the memory table is cut: one row per quant where it fits, else on its side."""
    from llmq.cli.app import app

    quants = ["bf16", "Q4_K_M", "gptq4-g128", "awq4", "nf4-dq", "Q2_K", "fp8", "int8"]
    args = ["estimate", "memory", _cfg(tmp_path), "--gpu", "l40s", "-c", "131072"]
    res = CliRunner().invoke(
        app, args + [a for q in quants for a in ("-q", q)], env={"COLUMNS": str(columns)}
    )
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert "…" not in res.output
    assert max(map(len, lines)) <= columns
    for word in ("weights", "KV", "other", "total", "max ctx", "seqs", "GPUs", "GiB", *quants):
        assert word in res.output, word
    header = [ln for ln in lines if "weights" in ln and "quant" in ln]
    assert bool(header) == (columns == 200)  # the wide layout only where it fits
