"""`quantize --method gguf` from an HF directory streams through the converter's plan: the same bytes as
converting to an f32 GGUF first and quantizing that, with no intermediate file."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import make_tiny_model

from llmq import api
from llmq.archs import permute_qk
from llmq.conversion import convert
from llmq.convert_rows import qk_source_rows
from llmq.quant.gguf.quantizer import GGUFQuantConfig, GGUFQuantizer

pytest.importorskip("transformers")


@pytest.mark.parametrize(
    ("arch", "ftype", "pure"),
    [
        ("llama", "Q4_K_M", False),
        ("qwen2", "Q6_K", True),
        ("gemma", "Q5_K_S", False),
        ("llama", "F16", False),
    ],
)
def test_streamed_output_is_the_two_step_output(tmp_path, monkeypatch, arch, ftype, pure) -> None:
    hf = make_tiny_model(
        tmp_path / "hf", arch=arch, hidden=256, layers=2, vocab=512, ffn=512, dtype="bfloat16"
    )
    f32, two_step = tmp_path / "f32.gguf", tmp_path / "two.gguf"
    convert(hf, f32, outtype="f32")
    cfg = GGUFQuantConfig(type=ftype, pure=pure, threads=2)
    GGUFQuantizer().run(f32, two_step, cfg)

    import llmq.conversion

    def no_intermediate(*a, **k):
        raise AssertionError("the streamed path must not convert to a file first")

    monkeypatch.setattr(llmq.conversion, "hf_to_gguf", no_intermediate)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    GGUFQuantizer().run(hf, out_dir / "o.gguf", cfg)
    assert (out_dir / "o.gguf").read_bytes() == two_step.read_bytes()
    assert [p.name for p in out_dir.iterdir()] == ["o.gguf"]


@pytest.mark.parametrize(("rows", "heads"), [(8, 2), (64, 4), (96, 3)])
def test_qk_source_rows_inverts_the_permutation(rows, heads) -> None:
    w = np.arange(rows * 3, dtype=np.float32).reshape(rows, 3)
    want = permute_qk(w, heads)
    for start, stop in [(0, rows), (1, rows - 1), (rows // 2, rows // 2 + 1)]:
        assert np.array_equal(w[qk_source_rows(rows, heads, start, stop)], want[start:stop])


def test_one_bits_per_weight_everywhere(tmp_path) -> None:
    hf = make_tiny_model(tmp_path / "hf", hidden=256, layers=2, vocab=512, ffn=512, shards=1)
    out = tmp_path / "o.gguf"
    plan = api.quantize_plan(hf, "gguf", type="Q4_K_M")
    res = api.quantize(hf, out, "gguf", type="Q4_K_M")
    bpw = api.inspect(out)["summary"]["bits_per_weight"]
    assert res.to_dict()["bits_per_weight"] == pytest.approx(bpw, abs=1e-12)
    assert plan["bits_per_weight"] == pytest.approx(bpw, abs=1e-12)
