"""llmq: quantize, convert, evaluate and size large language models.

The public API lives in :mod:`llmq.api` and is re-exported here lazily, so ``import llmq`` stays light.
"""

from __future__ import annotations

__version__ = "0.1.0"

_API = ("convert", "quantize", "perplexity", "compare_perplexity", "estimate_memory", "inspect")

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from llmq import api

        return getattr(api, name)
    raise AttributeError(f"module 'llmq' has no attribute {name!r}")
