"""Builders shared by the tests: tiny random HF checkpoints with a real (trained) tokenizer."""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """LLMQ_SHARED, or ../shared beside the repository (as CI lays it out)."""
    for cand in (os.environ.get("LLMQ_SHARED"), REPO.parent / "shared"):
        if cand and (Path(cand) / "data").is_dir():
            return Path(cand)
    raise FileNotFoundError("../shared/data is missing (set LLMQ_SHARED)")


def wikitext_path() -> Path:
    return shared_dir() / "data" / "wikitext-2-raw" / "wiki.test.raw"


@lru_cache(maxsize=1)
def pydocs_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


@lru_cache(maxsize=4)
def _trained_tokenizer_json(vocab: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = pydocs_text()
    tok.train_from_iterator([text[i : i + 2000] for i in range(0, 200_000, 2000)], trainer=trainer)
    return tok.to_str()


def write_tokenizer(path: Path, vocab: int) -> None:
    (path / "tokenizer.json").write_text(_trained_tokenizer_json(vocab))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<|endoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "add_bos_token": False,
                "model_max_length": 2048,
                "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}",
            }
        )
    )


@lru_cache(maxsize=4)
def _trained_spm(vocab: int) -> bytes:
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    lines = [ln for ln in pydocs_text().splitlines() if ln.strip()][:4000]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, bos_id=2, eos_id=1, unk_id=3, pad_id=0,
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"], minloglevel=2,
    )  # fmt: skip
    return buf.getvalue()


def write_spm_tokenizer(path: Path, vocab: int) -> None:
    """A trained SentencePiece model laid out as Gemma/Llama-2 checkpoints ship it (tokenizer.model)."""
    (path / "tokenizer.model").write_bytes(_trained_spm(vocab))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
        "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
    }))  # fmt: skip


def make_tiny_model(path: Path, arch: str = "llama", hidden: int = 256, layers: int = 2, vocab: int = 512,
                    heads: int = 4, kv_heads: int = 2, ffn: int = 512, shards: int = 2, dtype: str = "float32",
                    tie: bool = False, seed: int = 0) -> Path:  # fmt: skip
    """A random llama/qwen2/qwen3/mistral checkpoint saved by transformers itself, sharded, with a tokenizer."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM),
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
    }[arch]
    kw = dict(
        hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, vocab_size=vocab, max_position_embeddings=2048, rms_norm_eps=1e-5,
        tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0, rope_theta=10000.0,
    )  # fmt: skip
    if arch in ("qwen3", "gemma", "gemma2"):
        kw["head_dim"] = hidden // heads
    if arch.startswith("gemma"):
        kw["tie_word_embeddings"] = True
    if arch == "gemma2":
        kw["query_pre_attn_scalar"] = hidden // heads
    cfg = cfg_cls(**kw)
    model = model_cls(cfg).to(getattr(torch, dtype))
    with torch.no_grad():
        for p in model.parameters():  # HF init is tiny (std 0.02); wider weights make logits informative
            if p.dim() == 2:
                p.normal_(0, 0.08)
            else:
                p.uniform_(0.8, 1.2)
    path.mkdir(parents=True, exist_ok=True)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(path, max_shard_size=max(1, total // shards + 1) if shards > 1 else "10GB")
    if arch.startswith("gemma"):
        write_spm_tokenizer(path, vocab)
    else:
        write_tokenizer(path, vocab)
    return path


def smollm2_gguf() -> Path:
    from llmq.io.hub import packaged_model

    return packaged_model()
