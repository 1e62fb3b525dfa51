"""The shared integer grid (llmq.quant.grid): RTN records, GPTQ's grid parameters and mse search, and that
RTN, GPTQ and AWQ all round onto this one grid."""

from __future__ import annotations

import pytest
import torch

from llmq.errors import BadInput, ShapeError
from llmq.quant.grid import fake_quantize, grid_params, quantize_codes, quantize_rtn


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [-1, 32])
def test_rtn_error_is_within_half_a_step(bits, sym, group_size):
    torch.manual_seed(bits)
    W = torch.randn(16, 128) * 0.05
    q = quantize_rtn(W, bits, group_size, sym)
    maxq = 2**bits - 1
    assert int(q.qweight.min()) >= 0 and int(q.qweight.max()) <= maxq
    assert q.scales.shape == (16, 1 if group_size == -1 else 128 // group_size)
    if sym:
        assert bool((q.zeros == 2 ** (bits - 1)).all())
    err = (q.dequantize() - W).abs()
    step = q.scales[:, q.group_index()]
    # every value inside the grid's range rounds to within half a step (sym clips the +absmax end by half a step)
    assert bool((err <= step * (1.0 if sym else 0.5) + 1e-7).all())
    # more bits, less error
    if bits < 8:
        assert (quantize_rtn(W, 8, group_size, sym).dequantize() - W).abs().mean() < err.mean()


def test_rtn_int8_is_nearly_lossless():
    W = torch.randn(8, 64)
    for sym in (True, False):
        q = quantize_rtn(W, 8, -1, sym)
        rel = (q.dequantize() - W).norm() / W.norm()
        assert rel < 0.006


def test_min_zero_for_gptq_v1():
    W = torch.rand(4, 64)  # all positive: the asymmetric zero point would be 0
    assert int(quantize_rtn(W, 4, 32, False).zeros.min()) == 0
    q = quantize_rtn(W, 4, 32, False, min_zero=1)
    assert int(q.zeros.min()) >= 1
    assert (q.dequantize() - W).abs().max() <= q.scales.max() / 2 + 1e-6


def test_rtn_rejects_bad_shapes_and_bits():
    with pytest.raises(ShapeError):
        quantize_rtn(torch.zeros(4, 100), 4, 64)
    with pytest.raises(ShapeError):
        quantize_rtn(torch.zeros(4, 64), 4, 0)
    with pytest.raises(BadInput):
        quantize_rtn(torch.zeros(4, 64), 9, 64)
    q = quantize_rtn(torch.zeros(4, 64), 4, 32, False)  # all-zero groups must not divide by zero
    assert torch.equal(q.dequantize(), torch.zeros(4, 64))


def test_grid_min_zero_for_gptq_v1():
    w = torch.tensor([[0.0, 0.1, 0.5, 1.0], [-0.001, 0.2, 0.3, 0.9]])
    _, zero = grid_params(w, 4, sym=False)
    assert zero.min() == 0
    scale, zero = grid_params(w, 4, sym=False, min_zero=1)
    assert zero.min() >= 1
    q = torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, 15)
    assert torch.allclose((q - zero[:, None]) * scale[:, None], w, atol=float(scale.max()))


def test_mse_range_search_never_worse_and_shrinks_outlier_groups():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 64, generator=g)
    w[:, 0] = 12.0  # one outlier per row: the full range wastes most codes on it
    for sym in (True, False):
        s0, z0 = grid_params(w, 4, sym)
        s1, z1 = grid_params(w, 4, sym, mse=2.0)

        def err(s, z):
            q = torch.clamp(torch.round(w / s[:, None]) + z[:, None], 0, 15)
            return ((q - z[:, None]) * s[:, None] - w).pow(2).sum(1)

        assert bool((err(s1, z1) <= err(s0, z0) + 1e-6).all())
        assert bool((s1 < s0).any())
    assert torch.equal(fake_quantize(w, 4, 32, True, mse=0.0), fake_quantize(w, 4, 32, True))


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [-1, 16])
def test_record_fake_quantize_and_codes_agree(sym, group_size):
    """quantize_rtn's record, fake_quantize's floats and quantize_codes are the same grid."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(8, 64, generator=g)
    q = quantize_rtn(w, 3, group_size, sym)
    assert torch.equal(q.dequantize(), fake_quantize(w, 3, group_size, sym))
    gs = 64 if group_size == -1 else group_size
    wg = w.reshape(-1, gs)
    scale, zero = grid_params(wg, 3, sym)
    assert torch.equal(q.qweight.reshape(-1, gs).float(), quantize_codes(wg, scale, zero, 3))
    assert torch.equal(q.scales.flatten(), scale) and torch.equal(q.zeros.flatten().float(), zero)


def test_symmetric_grid_is_absmax_over_half_the_codes():
    w = torch.tensor([[-0.7, 0.1, 0.35, 0.2]])
    scale, zero = grid_params(w, 4, sym=True)
    assert torch.allclose(scale, torch.tensor([1.4 / 15])) and float(zero) == 8.0


def test_methods_share_the_grid():
    """RTN's quantizer, AWQ's final rounding and GPTQ's group parameters all come from llmq.quant.grid."""
    from llmq.quant.blockwise import awq, gptq
    from llmq.quant.layerwise import rtn

    assert rtn.quantize_rtn is quantize_rtn
    assert awq.quantize_rtn is quantize_rtn and awq.fake_quantize is fake_quantize
    assert gptq.grid_params is grid_params
    # GPTQ with an identity Hessian and static groups is plain RTN on this grid
    g = torch.Generator().manual_seed(5)
    W = torch.randn(16, 64, generator=g) * 0.1
    qw, _ = gptq.gptq_quantize(W, torch.eye(64), bits=4, group_size=32, sym=False, static_groups=True,
                               damp_percent=0.0)  # fmt: skip
    ref = quantize_rtn(W, 4, 32, False)
    assert torch.equal(qw.scales, ref.scales) and torch.equal(qw.zeros, ref.zeros)
