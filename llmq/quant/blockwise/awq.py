"""AWQ (Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration").

Salient input channels (large mean |x|) lose less to rounding when their weights are scaled up before
quantization and their inputs scaled down by the same factor. For each scaling group (Linears sharing an input,
the op producing that input) the per-channel scale is searched on a grid of 20 ratios r:

    s = mean|x|^r / mean|ŵ|^(1-r)  (duo scaling; ŵ = |w| normalised per quantization group),
    s /= sqrt(max(s) · min(s)),

and the r whose fake-quantized group gives the smallest output error of the enclosing module (attention for
q/k/v, the MLP for gate/up, the Linear itself for o and down) wins. Then a clipping search shrinks each group's
range (20 steps, down to 50 %) to minimise the Linear's output error. The scales are folded into the preceding
norm / Linear, so the checkpoint holds plain quantized Linears and nothing extra.

Two exact speed-ups over the reference implementations: when the inspected module is the Linear itself, its
output error is computed from the input's Gram matrix (tr(ΔW·XᵀX·ΔWᵀ), independent of the token count); and
q/k/v or gate/up that share one input are searched together, as in the paper. For the attention and the MLP the
search forwards a fixed, evenly spaced subset of at most ``SEARCH_TOKENS`` calibration tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from llmq.errors import BadInput
from llmq.formats.base import QuantizedLinear
from llmq.quant.base import Progress, QuantConfig, QuantizeResult, no_progress, quantizers
from llmq.quant.blockwise.config import BlockwiseConfig
from llmq.quant.grid import fake_quantize, quantize_rtn

if TYPE_CHECKING:
    import torch

N_GRID = 20
MAX_SHRINK = 0.5
SEARCH_TOKENS = 4096  # tokens forwarded per grid point when the inspected module is attention or the MLP
CLIP_TOKENS = 512  # tokens of the clip search (the reference uses 512 too)
# the attention score is sensitive to q/k ranges: the reference implementations do not clip them
NO_CLIP = ("self_attn.q_proj", "self_attn.k_proj")

AWQ_FORMATS = ("awq", "gptq", "compressed-tensors", "fake-quant")


@dataclass(frozen=True)
class AWQConfig(BlockwiseConfig):
    format: str = "awq"
    sym: bool = False  # the AWQ GEMM format stores zero points
    duo_scaling: bool = True
    n_grid: int = N_GRID
    search_tokens: int = SEARCH_TOKENS

    formats: ClassVar[tuple[str, ...]] = AWQ_FORMATS

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.format == "awq" and (self.bits != 4 or self.sym):
            raise BadInput("the awq (GEMM) format stores 4-bit asymmetric weights: use --bits 4 without --sym, "
                           "or --format gptq / compressed-tensors")  # fmt: skip
        if self.n_grid < 1:
            raise BadInput("n_grid must be positive")


def _w_mean(W: torch.Tensor, group_size: int) -> torch.Tensor:
    """Mean over rows of |w| normalised by its quantization group's max: how 'large' each column is."""
    rows, cols = W.shape
    g = cols if group_size <= 0 else group_size
    w = W.abs().reshape(-1, g)
    w = w / w.amax(dim=1, keepdim=True).clamp(min=1e-8)
    return w.reshape(rows, cols).mean(0)


def _subsample(batches: list[torch.Tensor], limit: int) -> list[int]:
    """Evenly spaced batch indices holding about ``limit`` tokens (all when fewer)."""
    per = batches[0].shape[0] * batches[0].shape[1]
    want = max(1, min(len(batches), -(-limit // per)))
    step = len(batches) / want
    return sorted({int(k * step) for k in range(want)})


class AWQBlockMethod:
    def __init__(self, config: AWQConfig):
        self.config = config

    # -- capture ---------------------------------------------------------------------------------------------
    def _capture(self, ctx):

        firsts = {grp[0] for grp in ctx.arch.sequential if any(n in ctx.targets for n in grp)}
        feats: dict[str, list[torch.Tensor]] = {n: [] for n in firsts}
        attn_kwargs: list[dict] = []
        handles = [ctx.module(n).register_forward_pre_hook(
            lambda _m, args, n=n: feats[n].append(args[0].detach())) for n in firsts]  # fmt: skip

        def attn_hook(_m, args, kwargs):
            attn_kwargs.append({k: v for k, v in kwargs.items() if k != "hidden_states"})

        handles.append(ctx.module("self_attn").register_forward_pre_hook(attn_hook, with_kwargs=True))
        try:
            for b in range(len(ctx.inputs)):
                ctx.forward(b)
        finally:
            for h in handles:
                h.remove()
        return feats, attn_kwargs

    # -- loss of one candidate -------------------------------------------------------------------------------
    def _inspect(self, ctx, sg, x: torch.Tensor, attn_kw: dict):
        mod = ctx.module(sg.inspect)
        if sg.inspect == "self_attn":
            return mod(hidden_states=x, **attn_kw)[0]
        return mod(x)

    def _search_scale(self, ctx, sg, feats, attn_kwargs, targeted) -> torch.Tensor:
        import torch

        cfg = self.config
        X = feats[sg.linears[0]]
        cols = X[0].shape[-1]
        dev = X[0].device
        x_mean = torch.zeros(cols, device=dev)
        n = 0
        for x in X:
            x_mean += x.reshape(-1, cols).abs().sum(0)
            n += x.numel() // cols
        x_mean /= n
        mods = [ctx.module(name) for name in sg.linears]
        originals = [m.weight.detach().clone() for m in mods]
        w_mean = _w_mean(torch.cat(originals, dim=0), cfg.group_size)
        linear_only = sg.inspect in sg.linears
        if linear_only:
            G = torch.zeros(cols, cols, device=dev)
            for x in X:
                xf = x.reshape(-1, cols)
                G.addmm_(xf.t(), xf)
        else:
            picks = _subsample(X, cfg.search_tokens)
            refs = [self._inspect(ctx, sg, X[b], attn_kwargs[b]) for b in picks]

        best, best_s = float("inf"), torch.ones(cols, device=dev)
        for k in range(cfg.n_grid):
            r = k / cfg.n_grid
            if cfg.duo_scaling:
                s = (x_mean.pow(r) / (w_mean.pow(1 - r) + 1e-4)).clamp(min=1e-4)
            else:
                s = x_mean.pow(r).clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            for m, w0, on in zip(mods, originals, targeted, strict=True):
                if on:
                    m.weight.data.copy_(
                        fake_quantize(w0 * s, cfg.bits, cfg.group_size, cfg.sym, cfg.min_zero) / s
                    )
            if linear_only:
                dW = mods[0].weight - originals[0]
                loss = float(torch.einsum("oi,ij,oj->", dW, G, dW))
            else:
                loss = sum(float((self._inspect(ctx, sg, X[b], attn_kwargs[b]) - ref).pow(2).sum())
                           for b, ref in zip(picks, refs, strict=True))  # fmt: skip
            if loss < best:
                best, best_s = loss, s.clone()
        for m, w0 in zip(mods, originals, strict=True):
            m.weight.data.copy_(w0)
        return best_s

    # -- folding ---------------------------------------------------------------------------------------------
    def _apply_scale(self, ctx, sg, s: torch.Tensor) -> None:
        prev = ctx.module(sg.prev)
        if sg.prev_kind == "norm":
            off = ctx.arch.norm_offset
            prev.weight.data.copy_((prev.weight + off) / s - off)
            if getattr(prev, "bias", None) is not None:
                prev.bias.data.div_(s)
        else:
            prev.weight.data.div_(s.unsqueeze(1))
            if prev.bias is not None:
                prev.bias.data.div_(s)
        for name in sg.linears:
            ctx.module(name).weight.data.mul_(s)

    def _clip(self, W: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        """Per (row, group) clipping range minimising the Linear's output error on CLIP_TOKENS tokens."""
        import torch

        cfg = self.config
        rows, cols = W.shape
        g = cols if cfg.group_size <= 0 else cfg.group_size
        ng = cols // g
        # per quantization group: [ng, tokens, g] @ [ng, g, rows] -> [ng, tokens, rows]
        X = (
            X[:: max(1, X.shape[0] // CLIP_TOKENS)][:CLIP_TOKENS]
            .reshape(-1, ng, g)
            .transpose(0, 1)
            .contiguous()
        )
        w = W.reshape(rows, ng, g)
        ref = torch.bmm(X, w.permute(1, 2, 0))
        org_max = w.abs().amax(dim=-1, keepdim=True)
        best_max = org_max.clone()
        best_err = torch.full((rows, ng, 1), float("inf"), device=W.device)
        for i in range(int(MAX_SHRINK * cfg.n_grid)):
            max_val = org_max * (1 - i / cfg.n_grid)
            cur = torch.clamp(w, -max_val, max_val)
            q = fake_quantize(cur.reshape(rows * ng, g), cfg.bits, g, cfg.sym, cfg.min_zero).reshape(
                rows, ng, g
            )
            err = (torch.bmm(X, q.permute(1, 2, 0)) - ref).pow(2).mean(dim=1).t().unsqueeze(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_max = torch.where(better, max_val, best_max)
        return torch.clamp(w, -best_max, best_max).reshape(rows, cols)

    # -- the block -------------------------------------------------------------------------------------------
    def quantize_block(self, ctx) -> dict[str, QuantizedLinear]:
        import torch

        cfg = self.config
        groups = []
        for sg in ctx.arch.scale_groups:
            if not any(n in ctx.targets for n in sg.linears):
                continue
            if sg.prev_kind == "linear":
                prev, nxt = ctx.module(sg.prev), ctx.module(sg.linears[0])
                if prev.out_features != nxt.in_features:  # GQA: v's rows do not map onto o's columns
                    continue
            groups.append(sg)
        feats, attn_kwargs = self._capture(ctx)
        for sg in groups:
            targeted = [n in ctx.targets for n in sg.linears]
            s = self._search_scale(ctx, sg, feats, attn_kwargs, targeted)
            self._apply_scale(ctx, sg, s)
            feats[sg.linears[0]] = [x / s for x in feats[sg.linears[0]]]  # inputs the scaled Linears now see
        # the input each target sees (after folding), for the clip search
        source = {n: grp[0] for grp in ctx.arch.sequential for n in grp}
        records: dict[str, QuantizedLinear] = {}
        for name in ctx.targets:
            mod = ctx.module(name)
            W = mod.weight.detach().float()
            if name not in NO_CLIP and name in source:
                X = torch.cat([x.reshape(-1, W.shape[1]) for x in feats[source[name]]])
                W = self._clip(W, X)
            qw = quantize_rtn(W, cfg.bits, cfg.group_size, cfg.sym, cfg.min_zero)
            mod.weight.data.copy_(qw.dequantize())
            records[name] = qw
        return records


@quantizers.register("awq")
class AWQQuantizer:
    name: ClassVar[str] = "awq"
    config_cls: ClassVar[type[QuantConfig]] = AWQConfig
    formats: ClassVar[tuple[str, ...]] = AWQ_FORMATS

    def plan(self, src: Path, config: QuantConfig):
        from llmq.quant.blockwise.pipeline import plan_output

        return plan_output(Path(src), config, self.name)

    def run(self, src: Path, out: Path, config: QuantConfig, *, force: bool = False,
            progress: Progress = no_progress) -> QuantizeResult:  # fmt: skip
        from llmq.quant.blockwise.pipeline import quantize_blockwise

        if not isinstance(config, AWQConfig):
            raise BadInput(f"awq needs an AWQConfig, got {type(config).__name__}")
        return quantize_blockwise(Path(src), Path(out), config, AWQBlockMethod(config), self.name,
                                  force=force, progress=progress)  # fmt: skip
