"""Llama (1/2/3) and Mistral: the reference llama layout, q/k rows permuted for llama.cpp's rope."""

from llmq.archs.base import Family

FAMILY = Family(
    "llama",
    model_types=("llama", "mistral"),
    hf_classes=("LlamaForCausalLM", "MistralForCausalLM", "LlamaModel"),
    hf_class="LlamaForCausalLM",
    permute_qk=True,
    attention_bias=False,
    extra_config={"mlp_bias": False},
    tokenizer="llama",
    writes_vocab_size=True,
)
