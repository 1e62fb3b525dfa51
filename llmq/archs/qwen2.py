"""Qwen2 / Qwen2.5: the llama layout with q/k/v biases, neox rope (no permutation)."""

from llmq.archs.base import LLAMA_BLOCK, Family

FAMILY = Family(
    "qwen2",
    model_types=("qwen2",),
    hf_classes=("Qwen2ForCausalLM", "Qwen2Model"),
    hf_class="Qwen2ForCausalLM",
    extra_config={"use_sliding_window": False},
    tokenizer="qwen",
    block_tensors=(*LLAMA_BLOCK, "attn_q.bias", "attn_k.bias", "attn_v.bias"),
)
