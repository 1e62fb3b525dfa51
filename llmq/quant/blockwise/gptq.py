"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers").

For one Linear with weight W [out, in] and calibration inputs X [in, n] the layer-wise objective is
||WX - ŴX||². Its Hessian is H = 2XXᵀ. Columns are quantized one at a time; the error of column i is spread over
the not-yet-quantized columns through the inverse Hessian. The paper's three practical changes are all here:

- the Cholesky-inverse formulation: only the upper Cholesky factor U of H⁻¹ is needed (row i of U holds, up to
  the scale U[i, i], the update coefficients of column i), which is stable where repeated inverse updates are not;
- lazy batch updates: error compensation inside a block of ``blocksize`` columns, one matmul for the rest;
- dampening: λ = damp_percent · mean(diag H) added to the diagonal, raised automatically when H is still not
  positive definite (the caller is told).

Options of the reference implementations: act-order (``act_order``: columns by descending diag H), static groups
(group parameters from the unquantized weight, so act-order needs no g_idx reordering at inference), symmetric or
asymmetric grids, bits 2/3/4/8, group sizes -1 (per row) / 32 / 64 / 128.

Rows of W are independent given H, so Linears that share an input (q/k/v, gate/up) are quantized as one stacked
matrix: the same result, fewer Python-level column steps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from llmq.errors import BadInput
from llmq.formats.base import QuantizedLinear
from llmq.quant.base import Progress, QuantConfig, QuantizeResult, no_progress, quantizers
from llmq.quant.blockwise.config import WRITE_FORMATS, BlockwiseConfig
from llmq.quant.grid import grid_params

if TYPE_CHECKING:
    import torch


Notify = Callable[[str], None]


# --------------------------------------------------------------------------------------------------------------
# the GPTQ solver
# --------------------------------------------------------------------------------------------------------------


class HessianAccumulator:
    """Running H = 2/n Σ x xᵀ over the calibration tokens seen by one Linear input (float32, in×in).

    ``token_clip`` (K > 0) bounds every token's weight: a token whose input norm exceeds K × the median token norm
    of its batch is scaled down to norm K × median, direction kept. This is for massive activations (the
    attention-sink tokens, e.g. the first token of every sample, whose norm can be 50–600× the median at some
    down_proj inputs): unbounded they dominate H, GPTQ then fits those few tokens and spreads large errors over
    the ordinary ones (on SmolLM2 one such layer alone adds more KL divergence than RTN on the whole model). Scaled
    down they still count, which the layers that *create* the massive activation need (dropping them there is
    far worse). ``token_clip=0`` is the paper's plain H.
    """

    def __init__(self, columns: int, device=None, token_clip: float = 0.0):
        import torch

        self.H = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.n = 0
        self.token_clip = token_clip
        self.clipped = 0
        # with float targets, one of: D = Σ (x_float - x) xᵀ [in, in], or P = Σ y_float xᵀ [out, in] where
        # y_float = W x_float is the layer's own output in the unquantized model (fewer flops when out < in)
        self.D: torch.Tensor | None = None
        self.P: torch.Tensor | None = None

    def add(
        self, x: torch.Tensor, x_float: torch.Tensor | None = None, y_float: torch.Tensor | None = None
    ) -> None:
        """Add a batch of inputs x; with float targets also the unquantized model's inputs ``x_float`` of the same
        tokens, or instead its outputs ``y_float`` of this layer (W x_float)."""
        import torch

        x = x.reshape(-1, x.shape[-1]).float()
        if x_float is not None:
            dx = x_float.reshape(-1, x.shape[-1]).float() - x
        if y_float is not None:
            y = y_float.reshape(x.shape[0], -1).float()
        if self.token_clip > 0 and x.shape[0] > 1:
            norms = x.norm(dim=1)
            bound = self.token_clip * norms.median()
            over = norms > bound
            if bool(over.any()):
                self.clipped += int(over.sum())
                f = torch.where(over, bound / norms, torch.ones_like(norms)).unsqueeze(1)
                x = x * f
                if x_float is not None:
                    dx = dx * f
                if y_float is not None:
                    y = y * f
        add_gram_upper(self.H, x)
        if x_float is not None:
            if self.D is None:
                self.D = torch.zeros_like(self.H)
            self.D.addmm_(dx.t(), x)
        if y_float is not None:
            if self.P is None:
                self.P = torch.zeros(y.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
            self.P.addmm_(y.t(), x)
        self.n += x.shape[0]

    def finish(self) -> torch.Tensor:
        import torch

        upper = torch.triu(self.H)
        return (upper + torch.triu(self.H, 1).t()) * self._scale()

    def finish_cross(self, W: torch.Tensor, H: torch.Tensor) -> torch.Tensor | None:
        """W·D on the same scale as ``finish()``'s H (which is passed in), None without float targets; from P,
        W·D = Σ (W x_float - W x) xᵀ = P - W·H."""
        if self.D is not None:
            return W.float() @ (self.D * self._scale())
        if self.P is not None:
            return (self.P * self._scale()).sub_(W.float() @ H)
        return None

    def _scale(self) -> float:
        return 2.0 / max(1, self.n)


GRAM_PANELS = 3


def add_gram_upper(H: torch.Tensor, x: torch.Tensor) -> None:
    """H += xᵀx on and above the diagonal only, in row panels (a third fewer flops than the full product for
    three panels; what lies below the diagonal is left as garbage, ``finish`` mirrors the upper triangle)."""
    n = x.shape[1]
    if n < 256:
        H.addmm_(x.t(), x)
        return
    step = -(-n // GRAM_PANELS)
    xt = x.t()
    for i in range(0, n, step):
        H[i : i + step, i:].addmm_(xt[i : i + step], x[:, i:])


def _inverse_cholesky(H: torch.Tensor, damp_percent: float, notify: Notify, label: str) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹; λ grows until H + λI is positive definite."""
    import torch

    mean_diag = torch.mean(torch.diag(H)).item()
    damp = damp_percent
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for _ in range(12):
        L, info = torch.linalg.cholesky_ex(H + eye * (damp * mean_diag))
        if info.item() == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info.item() == 0:
                if damp != damp_percent:
                    notify(f"{label}: Hessian not positive definite with damp_percent={damp_percent:g}; "
                           f"used {damp:g}")  # fmt: skip
                return U
        damp = damp * 2 if damp > 0 else 0.01
    raise BadInput(f"{label}: Hessian is not positive definite even with damp_percent={damp:g}")


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    *,
    bits: int = 4,
    group_size: int = 128,
    sym: bool = True,
    act_order: bool = False,
    static_groups: bool = False,
    damp_percent: float = 0.2,
    blocksize: int = 128,
    min_zero: int = 0,
    mse: float = 0.0,
    notify: Notify = lambda msg: None,
    label: str = "layer",
) -> tuple[QuantizedLinear, float]:
    """Quantize W [out, in] given H [in, in]; returns the codes/grid and the layer's summed error estimate."""
    import torch

    rows, cols = W.shape
    W = W.detach().float().clone()
    H = H.detach().float().clone()
    if group_size > 0 and cols % group_size:
        raise BadInput(f"{label}: {cols} input columns do not divide by group size {group_size}")
    g = cols if group_size <= 0 else group_size
    n_groups = cols // g

    # columns no calibration token ever activated: their weight cannot matter, pin them to 0
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    dev = W.device
    scales = torch.zeros(rows, n_groups, device=dev)
    zeros = torch.zeros(rows, n_groups, device=dev)
    if static_groups or group_size <= 0:
        # group parameters from the unquantized weight, in original column order
        sc, zr = grid_params(W.reshape(rows * n_groups, g), bits, sym, min_zero, mse)
        scales, zeros = sc.reshape(rows, n_groups), zr.reshape(rows, n_groups)

    perm = torch.arange(cols, device=dev)
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    U = _inverse_cholesky(H, damp_percent, notify, label)  # O(n³) LAPACK: all threads
    del H
    with single_thread():
        Q, scales, zeros, loss = _column_loop(W, U, scales, zeros, perm, g, bits, sym, min_zero, mse, blocksize,
                                              dynamic=group_size > 0 and not static_groups)  # fmt: skip
    group_of_pos = perm // g if (static_groups or group_size <= 0) else torch.arange(cols, device=dev) // g
    inv = torch.argsort(perm)
    qweight = Q[:, inv].to(torch.uint8)
    g_idx = group_of_pos[inv].to(torch.int32)
    qw = QuantizedLinear(qweight, scales, zeros.to(torch.int32), bits, group_size, sym, g_idx)
    return qw, float(loss.sum())


def float_target_weight(W: torch.Tensor, H: torch.Tensor, WD: torch.Tensor, alpha: float,
                        damp_percent: float) -> torch.Tensor:  # fmt: skip
    """The weight that best maps the inputs this layer really gets (those of the already quantized layers
    before it, X) onto the outputs the unquantized model gives (W·X_float), in least squares:
    W' = W + alpha·W·D·H⁻¹ with H = XᵀX, D = (X_float - X)ᵀX (both as accumulated, damped like GPTQ's H;
    ``WD`` is the product W·D, from ``HessianAccumulator.finish_cross``).
    Since W·X_float - W'·X is orthogonal to X, ||W·X_float - Q·X||² = ||(W' - Q)·X||² + const: GPTQ on W'
    minimises the error against the unquantized model's outputs (asymmetric calibration, as GPTAQ / GPTQModel's
    v2); ``alpha`` < 1 shrinks the correction towards plain GPTQ."""
    import torch

    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    Hd = H + eye * (max(damp_percent, 1e-6) * torch.diag(H).mean())
    L, info = torch.linalg.cholesky_ex(Hd)
    if int(info):
        return W
    corr = torch.cholesky_solve(WD.t(), L).t()
    return W + alpha * corr


@contextmanager
def single_thread() -> Iterator[None]:
    """The column loop is thousands of small vector ops: one thread avoids OpenMP spin/sync overhead, which
    dominates (4-5x slower) when cores are shared."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _column_loop(W, U, scales, zeros, perm, g: int, bits: int, sym: bool, min_zero: int, mse: float, blocksize: int,
                 dynamic: bool, inner: int = 16):  # fmt: skip
    """The GPTQ column loop with lazy batch updates, in place on W (permuted order).

    Two levels of lazy updates: the errors of a batch of ``blocksize`` columns reach the columns after it in one
    matmul (the paper's batching), and inside a batch, those of ``inner`` columns reach the rest of the batch in
    one matmul too, so each column's own update touches at most ``inner`` columns. Same arithmetic, up to float
    rounding; on CPU this loop is op-count bound, so every per-column step is one in-place op where possible.
    """
    import torch

    rows, cols = W.shape
    maxq = 2**bits - 1
    # group of each permuted position: dynamic groups follow the processing order, static ones the original
    group_of_pos = (torch.arange(cols, device=W.device) // g if dynamic else perm // g).tolist()
    if dynamic and g % inner:
        inner = blocksize  # a new group's parameters need every earlier error applied: align to groups
    Q = torch.zeros(rows, cols, device=W.device)
    loss = torch.zeros(rows, device=W.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        n = i2 - i1
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for j1 in range(0, n, inner):
            j2 = min(j1 + inner, n)
            for i in range(j1, j2):
                col = i1 + i
                gi = group_of_pos[col]
                if dynamic and col % g == 0:
                    # parameters from the current, already error-compensated columns of this group
                    cur = (
                        torch.cat([W1[:, i : i + g], W[:, i2 : col + g]], dim=1)
                        if col + g > i2
                        else W1[:, i : i + g]
                    )
                    scales[:, gi], zeros[:, gi] = grid_params(cur, bits, sym, min_zero, mse)
                s, z = scales[:, gi], zeros[:, gi]
                w = W1[:, i]
                q = torch.div(w, s).round_().add_(z).clamp_(0, maxq)
                Q[:, col] = q
                err = Err1[:, i]
                torch.sub(w, q.sub_(z).mul_(s), out=err)  # w - dequantized
                err.div_(U1[i, i])
                if i + 1 < j2:
                    W1[:, i + 1 : j2].addr_(err, U1[i, i + 1 : j2], alpha=-1)
            if j2 < n:
                W1[:, j2:].addmm_(Err1[:, j1:j2], U1[j1:j2, j2:], alpha=-1)
        loss += Err1.pow(2).sum(1) / 2
        if i2 < cols:
            W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1)
    return Q, scales, zeros, loss


# --------------------------------------------------------------------------------------------------------------
# one decoder block
# --------------------------------------------------------------------------------------------------------------


class GPTQBlockMethod:
    """GPTQ over one block: Hessians from the block's real inputs, group by group.

    With ``true_sequential`` the Hessians of a group are collected after the groups before it were quantized
    (o_proj sees the output of the quantized q/k/v), and each stage's forward stops as soon as its inputs are seen.
    """

    def __init__(self, config: GPTQConfig):
        self.config = config

    def stages(self, ctx) -> list[list[list[str]]]:
        # a stage is a list of input-sharing groups quantized on the same Hessian pass
        groups = [[n for n in grp if n in ctx.targets] for grp in ctx.arch.sequential]
        groups = [g for g in groups if g]
        return [[g] for g in groups] if self.config.true_sequential else [groups]

    def quantize_block(self, ctx) -> dict[str, QuantizedLinear]:
        from llmq.quant.blockwise.pipeline import staged_forward_fits

        cfg = self.config
        records: dict[str, QuantizedLinear] = {}
        stages = self.stages(ctx)
        if cfg.true_sequential and staged_forward_fits(ctx):
            # one forward for the whole block: paused at each group's input while that group is quantized
            groups = [stage[0] for stage in stages]
            points = [grp[0] for grp in groups]
            accs = [self._accumulator(ctx, grp) for grp in groups]
            floats = self._float_targets(ctx, groups) if cfg.float_target > 0 else None
            ctx.outputs = ctx.run_staged(
                points,
                lambda k, b, x: accs[k].add(x, **({} if floats is None else floats[k][b])),
                lambda k: self._quantize_group(ctx, groups[k], accs[k], records),
            )
            return records
        groups = [grp for stage in stages for grp in stage]
        points = [grp[0] for grp in groups]
        floats = self._float_targets(ctx, groups) if cfg.float_target > 0 else None
        for stage in stages:
            accs = {grp[0]: self._accumulator(ctx, grp) for grp in stage}

            def add(name, accs=accs):
                k = points.index(name)
                return lambda b, x: accs[name].add(x, **({} if floats is None else floats[k][b]))

            ctx.run_until({name: add(name) for name in accs}, stop_after=set(accs))
            for grp in stage:
                self._quantize_group(ctx, grp, accs.pop(grp[0]), records)
        return records

    def _float_targets(self, ctx, groups: list[list[str]]) -> list[list[dict[str, torch.Tensor]]]:
        """The unquantized block on the unquantized model's hidden states: per group and batch, what
        ``HessianAccumulator.add`` needs of it. That is the group's input (``x_float``), or, for a single Linear
        whose output is narrower than its input (down_proj: 576 against 1536 on SmolLM2; the stacked q/k/v and
        gate/up groups are always wider), its output (``y_float``): the cross term then costs out×in instead of
        in×in per token, and less memory. The block's outputs become the next block's float inputs."""
        from dataclasses import replace

        from llmq.quant.blockwise.pipeline import forward_all

        seen: list[list[dict]] = [[] for _ in groups]
        handles = []
        for k, grp in enumerate(groups):
            first = ctx.module(grp[0])
            if len(grp) == 1 and first.out_features < first.in_features:
                handles.append(first.register_forward_hook(
                    lambda _m, _args, out, k=k: seen[k].append({"y_float": out.detach()})))  # fmt: skip
            else:
                handles.append(first.register_forward_pre_hook(
                    lambda _m, args, k=k: seen[k].append({"x_float": args[0].detach()})))  # fmt: skip
        try:
            ctx.float_outputs = forward_all(replace(ctx, inputs=ctx.float_inputs))
        finally:
            for h in handles:
                h.remove()
        return seen

    def _accumulator(self, ctx, grp: list[str]) -> HessianAccumulator:
        mod = ctx.module(grp[0])
        return HessianAccumulator(mod.in_features, mod.weight.device, self.config.token_clip)

    def _quantize_group(self, ctx, grp: list[str], acc: HessianAccumulator, records: dict) -> None:
        import torch

        cfg = self.config
        mods = [ctx.module(n) for n in grp]
        W = torch.cat([m.weight for m in mods], dim=0)
        label = ctx.prefix + "{" + ",".join(grp) + "}"
        H = acc.finish()
        WD = acc.finish_cross(W, H)  # None without float targets
        acc.H = acc.D = acc.P = None  # free them before the quantization's own copies
        if WD is not None:
            W = float_target_weight(W, H, WD, cfg.float_target, cfg.damp_percent)
        qw, _loss = gptq_quantize(W, H, bits=cfg.bits, group_size=cfg.group_size, sym=cfg.sym,
                                  act_order=cfg.act_order, static_groups=cfg.static_groups,
                                  damp_percent=cfg.damp_percent, blocksize=cfg.blocksize, min_zero=cfg.min_zero,
                                  mse=cfg.mse, notify=ctx.notes.append, label=label)  # fmt: skip
        if acc.clipped:
            ctx.notes.append(f"{label}: {acc.clipped} of {acc.n} calibration tokens had more than "
                             f"{cfg.token_clip:g}x the median input norm; their weight in H was bounded "
                             "(--token-clip)")  # fmt: skip
        for name, mod, part in zip(grp, mods, qw.split_rows([m.out_features for m in mods]), strict=True):
            mod.weight.data.copy_(part.dequantize())
            records[name] = part


# --------------------------------------------------------------------------------------------------------------
# config + plugin
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GPTQConfig(BlockwiseConfig):
    act_order: bool = False
    static_groups: bool = False
    true_sequential: bool = True
    damp_percent: float = 0.2
    blocksize: int = 128
    token_clip: float = 10.0
    mse: float = 0.0
    float_target: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.float_target <= 1:
            raise BadInput("--float-target must be in [0, 1] (0: off)")
        if not 0 <= self.damp_percent < 1:
            raise BadInput("--damp-percent must be in [0, 1)")
        if self.mse < 0:
            raise BadInput("--mse must be 0 (off) or a positive norm such as 2.4")
        if not (self.token_clip == 0 or self.token_clip >= 1):
            raise BadInput("--token-clip must be 0 (off) or >= 1 (times the median token norm)")
        if self.blocksize < 1:
            raise BadInput("--blocksize must be positive")
        if self.format == "gptq" and self.bits not in (2, 3, 4, 8):
            raise BadInput(f"the gptq format stores 2/3/4/8 bits, not {self.bits}")


@quantizers.register("gptq")
class GPTQQuantizer:
    name: ClassVar[str] = "gptq"
    config_cls: ClassVar[type[QuantConfig]] = GPTQConfig
    formats: ClassVar[tuple[str, ...]] = WRITE_FORMATS

    def plan(self, src: Path, config: QuantConfig):
        from llmq.quant.blockwise.pipeline import plan_output

        return plan_output(Path(src), config, self.name)

    def run(self, src: Path, out: Path, config: QuantConfig, *, force: bool = False,
            progress: Progress = no_progress) -> QuantizeResult:  # fmt: skip
        from llmq.quant.blockwise.pipeline import quantize_blockwise

        if not isinstance(config, GPTQConfig):
            raise BadInput(f"gptq needs a GPTQConfig, got {type(config).__name__}")
        return quantize_blockwise(Path(src), Path(out), config, GPTQBlockMethod(config), self.name,
                                  force=force, progress=progress)  # fmt: skip
