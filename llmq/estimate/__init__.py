"""Memory estimation from headers only: weights per format, KV cache per engine, overhead, solvers. No torch."""

from llmq.estimate.memory import Estimate, EstimateConfig, QuantEstimate, estimate_memory

__all__ = ["Estimate", "EstimateConfig", "QuantEstimate", "estimate_memory"]
