"""Tiny random checkpoints of the newer families, built with transformers' own config classes (no tests here)."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import write_spm_tokenizer, write_tokenizer


def _config(family: str, vocab: int):
    import transformers

    common = dict(vocab_size=vocab, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                  rms_norm_eps=1e-6)  # fmt: skip
    if family == "gemma3":  # 5 local : 1 global, two rope bases, explicit head_dim, GQA
        return transformers.Gemma3TextConfig(
            hidden_size=128, intermediate_size=256, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, head_dim=48, sliding_window=16, rope_theta=1e6, rope_local_base_freq=1e4,
            query_pre_attn_scalar=48, tie_word_embeddings=True, **common,
        )  # fmt: skip
    if family == "phi3":  # longrope with its long/short factors, GQA
        hd = 32
        rng = [1.0 + 0.05 * i for i in range(hd // 2)]
        return transformers.Phi3Config(
            hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, original_max_position_embeddings=1024, sliding_window=None,
            rope_scaling={"rope_type": "longrope", "long_factor": [2 * f for f in rng], "short_factor": rng},
            tie_word_embeddings=False, **{**common, "max_position_embeddings": 4096},
        )  # fmt: skip
    if family == "olmo2":
        return transformers.Olmo2Config(
            hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=False, **common,
        )  # fmt: skip
    if family == "granite":  # the four multipliers, none of them 1
        return transformers.GraniteConfig(
            hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, embedding_multiplier=6.0, attention_multiplier=0.0625, residual_multiplier=0.5,
            logits_scaling=4.0, tie_word_embeddings=False, **common,
        )  # fmt: skip
    raise KeyError(family)


def make_family_model(path: Path, family: str, vocab: int = 512, seed: int = 0) -> Path:
    """A random ``family`` checkpoint saved by transformers, with a tokenizer llmq converts."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = _config(family, vocab)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(torch.float32)
    with torch.no_grad():
        for p in model.parameters():  # HF init is tiny (std 0.02); wider weights make logits informative
            if p.dim() == 2:
                p.normal_(0, 0.08)
            else:
                p.uniform_(-0.2, 0.2) if family.startswith("gemma") else p.uniform_(0.8, 1.2)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    if family.startswith("gemma"):
        write_spm_tokenizer(path, vocab)
    else:
        write_tokenizer(path, vocab)
    return path
