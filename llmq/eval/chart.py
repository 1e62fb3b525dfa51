"""PNG chart of a comparison: bits per weight against KL divergence (or PPL when there is no base)."""

from __future__ import annotations

import math
from pathlib import Path

from llmq.errors import BadInput, require
from llmq.eval.perplexity import PerplexityResult


def _label(spec: str) -> str:
    return Path(spec).name or spec


def write_chart(path: str | Path, results: list[PerplexityResult], force: bool = False) -> Path:
    """Scatter of bits per weight (x) against mean KLD (y, log scale) or PPL, one labelled point per model."""
    require("matplotlib", "plot")
    import matplotlib

    matplotlib.use("Agg")  # no display needed; never pick an interactive backend in a CLI
    import matplotlib.pyplot as plt

    from llmq.io.base import AtomicOutput, check_output

    if not results:
        raise BadInput("nothing to chart")
    out = check_output(path, force)
    use_kld = all(r.kld is not None for r in results)
    xs = [r.bits_per_weight for r in results]
    ys = [max(r.kld.kld_mean.value, 1e-6) if use_kld else r.ppl.value for r in results]  # type: ignore[union-attr]
    errs = [r.kld.kld_mean.se if use_kld else r.ppl.se for r in results]  # type: ignore[union-attr]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ax.errorbar(xs, ys, yerr=errs, fmt="o", capsize=3)
    for x, y, r in zip(xs, ys, results, strict=True):
        if math.isfinite(x):
            ax.annotate(_label(r.model), (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("bits per weight")
    if use_kld:
        ax.set_yscale("log")
        ax.set_ylabel("mean KL divergence vs base (nats)")
    else:
        ax.set_ylabel("perplexity")
    ax.grid(True, which="both", alpha=0.3)
    ds = results[0].config.get("dataset", "")
    ax.set_title(f"{ds}, ctx {results[0].config.get('ctx')}")
    fig.tight_layout()
    with AtomicOutput(out, is_dir=False, force=force) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out
