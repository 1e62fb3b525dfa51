"""Budgeted GGUF mixes: the exact knapsack, the sensitivity proxy, recipes and the quantize options."""

from __future__ import annotations

import itertools
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf_helpers import tiny_llama_tensors, write_llama_gguf

from llmq.errors import BadInput, OutputExists
from llmq.quant.allocate import allocate
from llmq.quant.gguf import budget
from llmq.quant.gguf.imatrix import Imatrix, save_imatrix
from llmq.quant.gguf.quantizer import GGUFQuantConfig, GGUFQuantizer

# ------------------------------------------------------------------------------------------------ allocate


def _brute(items, cap):
    best = None
    for ch in itertools.product(*[range(len(it)) for it in items]):
        w = sum(items[i][c][0] for i, c in enumerate(ch))
        loss = sum(items[i][c][1] for i, c in enumerate(ch))
        if w <= cap and (best is None or loss < best):
            best = loss
    return best


@pytest.mark.parametrize("seed", range(4))
def test_allocate_is_exact_against_brute_force(seed) -> None:
    rng = random.Random(seed)
    for _ in range(120):
        n = rng.randint(1, 6)
        step = rng.choice([1, 2, 34, 144])
        items = [
            [(rng.randint(0, 40) * step, rng.random()) for _ in range(rng.randint(1, 4))] for _ in range(n)
        ]
        cap = rng.randint(0, 150 * step)
        best = _brute(items, cap)
        if best is None:
            with pytest.raises(BadInput):
                allocate(items, cap)
            continue
        a = allocate(items, cap)
        assert a.exact and a.gap == 0.0
        assert a.weight <= cap
        assert a.weight == sum(items[i][c][0] for i, c in enumerate(a.choice))
        assert a.loss == pytest.approx(best, abs=1e-12)


def test_allocate_coarse_grid_fits_and_is_certified() -> None:
    rng = random.Random(5)
    items = [[(rng.randint(1, 10_000), rng.random()) for _ in range(4)] for _ in range(8)]
    cap = 40_000
    best = _brute(items, cap)
    a = allocate(items, cap, max_cells=200)  # forces a grid coarser than the gcd
    assert not a.exact and a.granularity > 1
    assert a.weight <= cap
    assert a.lower_bound <= best + 1e-12 <= a.loss + 1e-12
    assert 0 <= a.gap < 1


def test_allocate_edge_cases() -> None:
    assert allocate([], 0).choice == ()
    # equal losses: the lighter option
    assert allocate([[(10, 1.0), (5, 1.0)]], 100).choice == (1,)
    with pytest.raises(BadInput, match="below the smallest"):
        allocate([[(10, 1.0)], [(5, 0.0)]], 14)
    with pytest.raises(BadInput):
        allocate([[]], 10)
    with pytest.raises(BadInput):
        allocate([[(1, float("nan"))]], 10)


# ------------------------------------------------------------------------------------------------ proxy


def test_candidates_follow_llama_quantize_fallbacks() -> None:
    # 576 is not a multiple of 256: the k-quants fall back like llama-quantize (Q2_K/Q3_K -> Q4_0, ...)
    assert budget.candidates((64, 576), ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")) == [
        "Q4_0", "Q5_0", "Q5_1", "Q8_0"]  # fmt: skip
    assert budget.candidates((64, 512), ("Q2_K", "Q4_K", "F16")) == ["Q2_K", "Q4_K", "F16"]


def test_proxy_loss_is_the_weighted_squared_error() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 256)).astype(np.float32)
    qw = rng.random(256).astype(np.float32) + 0.1
    xq = budget.roundtrip(x, "Q4_K", qw)
    want = sum(float(qw[j]) * float(x[i, j] - xq[i, j]) ** 2 for i in range(8) for j in range(256))
    assert budget.proxy_loss(x, xq, qw) == pytest.approx(want, rel=1e-9)
    losses = budget.tensor_losses(x, qw, ["Q2_K", "Q3_K", "Q4_K", "Q6_K", "Q8_0", "F16"], 1.0)
    order = [losses[t] for t in ("Q2_K", "Q3_K", "Q4_K", "Q6_K", "Q8_0", "F16")]
    assert order == sorted(order, reverse=True) and order[-1] > 0
    assert budget.proxy_loss(x, budget.roundtrip(x, "F32", qw), qw) == 0.0


def test_sample_rows() -> None:
    assert list(budget.sample_rows(5, 10)) == [0, 1, 2, 3, 4]
    idx = budget.sample_rows(10_000, 512)
    assert len(idx) == 512 and idx[0] == 0 and idx[-1] == 9999 and (np.diff(idx) > 0).all()


def test_parse_types() -> None:
    assert budget.parse_types("q4_k, Q6_K,q4_k") == ("Q4_K", "Q6_K")
    assert budget.parse_types(None) == budget.DEFAULT_TYPES
    for bad in ("", "Q9_Z", "IQ2_XXS"):
        with pytest.raises(BadInput):
            budget.parse_types(bad)


# ------------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path, dict[str, np.ndarray]]:
    d = tmp_path_factory.mktemp("budget")
    t = tiny_llama_tensors(hidden=256, n_layers=4, ff=512, vocab=256, n_head=4, n_kv=1, seed=11)
    src = write_llama_gguf(d / "tiny-f32.gguf", t, n_head=4, n_kv=1)
    rng = np.random.default_rng(3)
    im = Imatrix(datasets=["unit"], chunk_count=2, chunk_size=64)
    for name, a in t.items():
        if a.ndim == 2 and name != "token_embd.weight":
            # some columns matter much more than others, differently per tensor
            im.sums[name] = (rng.lognormal(0, 1.5, (1, a.shape[1])) * 100).astype(np.float32)
            im.counts[name] = np.array([128])
    return src, save_imatrix(im, d / "im.gguf"), t


def _tensor_bytes(path: Path) -> tuple[int, int, dict[str, str]]:
    from llmq.io.gguf import GGUFReader

    with GGUFReader(path, decode_strings=False) as r:
        infos = list(r.infos())
    return sum(t.nbytes for t in infos), sum(t.numel for t in infos), {t.name: t.dtype for t in infos}


def _meta(path: Path, key: str):
    from llmq.io.gguf import GGUFReader

    with GGUFReader(path, decode_strings=True) as r:
        return r.metadata.get(key)


def test_budget_is_met_optimal_and_replayable(tmp_path, tiny) -> None:
    src, im, _ = tiny
    q = GGUFQuantizer()
    fixed = tmp_path / "q4km.gguf"
    q.run(src, fixed, GGUFQuantConfig(type="Q4_K_M", imatrix=str(im)))
    fbytes, numel, ftypes = _tensor_bytes(fixed)
    bpw = 8 * fbytes / numel
    out = tmp_path / "budget.gguf"
    res = q.run(
        src,
        out,
        GGUFQuantConfig(imatrix=str(im), target_bpw=bpw, budget_types="Q2_K,Q3_K,Q4_K,Q5_K,Q6_K,Q8_0"),
    )
    obytes, _, otypes = _tensor_bytes(out)
    assert obytes <= fbytes
    assert len(set(otypes.values())) > 2  # a real mix
    recipe_file = Path(str(out) + ".recipe.json")
    rec = json.loads(recipe_file.read_text())
    assert rec["types"] == otypes and rec["predicted"]["optimal"] is True
    assert rec["predicted"]["tensor_bytes"] == obytes
    assert any("budgeted mix" in n for n in res.notes)
    # the fixed mix is one feasible point of the same problem: the optimum is no worse under the proxy
    sens = rec["sensitivity"]
    fixed_loss = sum(sens[n][ftypes[n]] for n in sens)
    assert rec["predicted"]["proxy_loss"] <= fixed_loss + 1e-9
    assert rec["predicted"]["proxy_loss"] == pytest.approx(sum(sens[n][otypes[n]] for n in sens))
    # metadata holds the map; --recipe (the JSON, or the GGUF itself) rewrites the same bytes
    meta = json.loads(_meta(out, budget.RECIPE_KEY))
    assert meta == {"base_type": "Q4_K_M", "types": otypes}
    for i, r in enumerate((recipe_file, out)):
        again = tmp_path / f"again{i}.gguf"
        q.run(src, again, GGUFQuantConfig(imatrix=str(im), recipe=str(r)))
        assert again.read_bytes() == out.read_bytes()
        assert not Path(str(again) + ".recipe.json").exists()


def test_more_budget_less_loss(tmp_path, tiny) -> None:
    src, im, _ = tiny
    losses = []
    for bpw in (3.0, 4.5, 6.5):
        out = tmp_path / f"b{bpw}.gguf"
        GGUFQuantizer().run(src, out, GGUFQuantConfig(imatrix=str(im), target_bpw=bpw))
        tb, numel, _ = _tensor_bytes(out)
        assert 8 * tb / numel <= bpw
        losses.append(json.loads(Path(str(out) + ".recipe.json").read_text())["predicted"]["proxy_loss"])
    assert losses[0] > losses[1] > losses[2]


def test_target_size_bounds_the_file(tmp_path, tiny) -> None:
    src, im, _ = tiny
    target = 1_100_000
    out = tmp_path / "s.gguf"
    rec = tmp_path / "mix.json"
    GGUFQuantizer().run(
        src, out, GGUFQuantConfig(imatrix=str(im), target_size="1100000", save_recipe=str(rec))
    )
    assert out.stat().st_size <= target
    assert rec.is_file() and not Path(str(out) + ".recipe.json").exists()
    # within the header margin of the target: the budget was used
    assert out.stat().st_size > target - 64 * 1024


def test_fit_uses_the_estimators_budget(tmp_path, tiny) -> None:
    from llmq.estimate.memory import EstimateConfig, estimate_memory

    src, im, _ = tiny
    out = tmp_path / "fit.gguf"

    def room(gib: float) -> tuple[int, int]:  # (GPU budget, bytes of the terms besides the weights)
        e = estimate_memory(EstimateConfig(model=str(src), quants=("Q8_0",), context=256, vram_gib=gib,
                                           engine="llama.cpp"))  # fmt: skip
        return e.budget_bytes, sum(t.nbytes for t in e.results[0].terms if t.name != "weights")

    (b1, others), (b2, _) = room(1.0), room(2.0)
    gib = 1.0 + (others + 1_200_000 - b1) / (b2 - b1)  # about 1.2 MB left for the weights
    GGUFQuantizer().run(src, out, GGUFQuantConfig(imatrix=str(im), fit=f"{gib:.9f}GiB", context=256))
    rec = json.loads(Path(str(out) + ".recipe.json").read_text())
    assert rec["budget"]["kind"] == "fit" and 1_100_000 < rec["budget"]["tensor_bytes"] < 1_300_000
    est = estimate_memory(EstimateConfig(model=str(out), context=256, vram_gib=gib, engine="llama.cpp"))
    assert est.results[0].fits
    # and the budget binds: the lightest-loss mix (all Q8_0) would not fit
    assert set(rec["types"].values()) != {"Q8_0", "F32"}


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        ({"target_bpw": 4.0}, "needs importance data"),
        ({"target_bpw": 4.0, "target_size": "1MB", "imatrix": "x"}, "exclusive"),
        ({"target_bpw": 0.0, "imatrix": "x"}, "target-bpw"),
        ({"target_size": "big", "imatrix": "x"}, "target-size"),
        ({"fit": "RTX-4090", "imatrix": "x"}, "needs --context"),
        ({"context": 4096}, "go with --fit"),
        ({"budget_types": "Q4_K"}, "need a budget"),
        ({"recipe": "r.json", "target_bpw": 4.0, "imatrix": "x"}, "cannot be combined"),
        ({"target_bpw": 4.0, "imatrix": "x", "budget_types": "Q9"}, "unknown ggml type"),
    ],
)
def test_option_errors(kw, msg) -> None:
    with pytest.raises(BadInput, match=msg):
        GGUFQuantConfig(**kw)


def test_runtime_errors_leave_nothing(tmp_path, tiny) -> None:
    src, im, t = tiny
    q = GGUFQuantizer()
    out = tmp_path / "o.gguf"
    with pytest.raises(BadInput, match="below the smallest mix"):
        q.run(src, out, GGUFQuantConfig(imatrix=str(im), target_bpw=1.0))
    with pytest.raises(BadInput, match="exceed the GPU budget"):
        q.run(src, out, GGUFQuantConfig(imatrix=str(im), fit="0.01GiB", context=4096))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"base_type": "Q4_K_M", "types": {"nope.weight": "Q4_K"}}))
    with pytest.raises(BadInput, match="does not match the source"):
        q.run(src, out, GGUFQuantConfig(recipe=str(bad)))
    types = {n: ("Q4_K" if a.ndim == 2 else "F32") for n, a in t.items()}
    types["blk.0.attn_norm.weight"] = "Q4_K"
    bad.write_text(json.dumps({"base_type": "Q4_K_M", "types": types}))
    with pytest.raises(BadInput, match="keeps it F32"):
        q.run(src, out, GGUFQuantConfig(recipe=str(bad)))
    bad.write_text("{not json")
    with pytest.raises(BadInput, match="not valid JSON"):
        q.run(src, out, GGUFQuantConfig(recipe=str(bad)))
    existing = Path(str(out) + ".recipe.json")
    existing.write_text("keep")
    with pytest.raises(OutputExists):
        q.run(src, out, GGUFQuantConfig(imatrix=str(im), target_bpw=5.0))
    assert existing.read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json", "o.gguf.recipe.json"]


def test_dry_run_and_inspect(tmp_path, tiny) -> None:
    from llmq import api

    src, im, _ = tiny
    with pytest.raises(BadInput, match="dry-run"):
        GGUFQuantizer().plan(src, GGUFQuantConfig(imatrix=str(im), target_bpw=4.0))
    out = tmp_path / "b.gguf"
    GGUFQuantizer().run(src, out, GGUFQuantConfig(imatrix=str(im), target_bpw=4.5))
    plan = GGUFQuantizer().plan(src, GGUFQuantConfig(recipe=str(out) + ".recipe.json"))
    assert {t.name: t.dtype for t in plan} == _tensor_bytes(out)[2]
    rep = api.inspect(out)
    assert rep["recipe"]["base_type"] == "Q4_K_M"
    assert rep["recipe"]["tensors"] == rep["summary"]["n_tensors"]
    assert rep["recipe"]["types"] == dict(sorted(rep["summary"]["types"].items()))


def test_cli_budget_and_inspect(tmp_path, tiny) -> None:
    from typer.testing import CliRunner

    from llmq.cli.app import app

    src, im, _ = tiny
    out = tmp_path / "c.gguf"
    r = CliRunner().invoke(app, ["quantize", str(src), "-o", str(out), "--method", "gguf", "--imatrix", str(im),
                                 "--target-bpw", "4.25", "--budget-types", "Q3_K,Q4_K,Q6_K"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert set(_tensor_bytes(out)[2].values()) <= {"Q3_K", "Q4_K", "Q6_K", "F32"}
    r = CliRunner().invoke(app, ["inspect", str(out), "--no-tensors"], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "recipe (quantize.recipe): base Q4_K_M" in r.output
    proc = subprocess.run([sys.executable, "-m", "llmq", "quantize", str(src), "-o", str(tmp_path / "d.gguf"),
                           "--method", "gguf", "--target-bpw", "4"], capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.startswith("error: a budget needs importance data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.gguf", "c.gguf.recipe.json"]


def test_pinned_and_unmeasured_tensors_keep_the_base_type(tmp_path, tiny) -> None:
    src, im, _ = tiny
    out = tmp_path / "p.gguf"
    cfg = GGUFQuantConfig(imatrix=str(im), target_bpw=4.0, tensor_type=("blk\\.0\\.ffn_down=Q8_0",))
    GGUFQuantizer().run(src, out, cfg)
    rec = json.loads(Path(str(out) + ".recipe.json").read_text())
    assert rec["types"]["blk.0.ffn_down.weight"] == "Q8_0"
    assert "blk.0.ffn_down.weight" not in rec["sensitivity"]
    # token_embd has no importance data: the base mix's type, not measured
    assert rec["types"]["token_embd.weight"] == "Q4_K" and "token_embd.weight" not in rec["sensitivity"]
    assert 8 * _tensor_bytes(out)[0] / _tensor_bytes(out)[1] <= 4.0
