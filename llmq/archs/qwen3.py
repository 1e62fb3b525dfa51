"""Qwen3 (dense): qwen2 without biases, plus per-head q/k RMSNorms (they sit after q/k: llama's groups hold)."""

from llmq.archs.base import LLAMA_BLOCK, Family

FAMILY = Family(
    "qwen3",
    model_types=("qwen3",),
    hf_classes=("Qwen3ForCausalLM", "Qwen3Model"),
    hf_class="Qwen3ForCausalLM",
    attention_bias=False,
    tokenizer="qwen",
    block_tensors=(*LLAMA_BLOCK, "attn_q_norm.weight", "attn_k_norm.weight"),
)
