"""Gemma (1): llama layout, RMSNorm as (1 + w) (stored shifted in GGUF), tied output, gelu-tanh MLP."""

from llmq.archs.base import Family

GELU_TANH = {"hidden_activation": "gelu_pytorch_tanh", "hidden_act": "gelu_pytorch_tanh"}

FAMILY = Family(
    "gemma",
    model_types=("gemma",),
    hf_classes=("GemmaForCausalLM",),
    hf_class="GemmaForCausalLM",
    attention_bias=False,
    extra_config=GELU_TANH,
    norm_shift=1.0,
    tied_output=True,
    tokenizer="gemma",
)
