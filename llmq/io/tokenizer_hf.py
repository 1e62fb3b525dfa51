"""GGUF tokenizer metadata -> Hugging Face tokenizer files that tokenize exactly as llama.cpp does.

llama.cpp's two common vocabularies, and how they are expressed with the `tokenizers` package:
- "gpt2" (byte-level BPE): llama.cpp splits the text with the regex list of its `tokenizer.ggml.pre` family
  (src/llama-vocab.cpp), maps bytes to GPT-2's printable characters and runs the merges. Here: one Split
  (Isolated) per regex, then ByteLevel without its own regex, then BPE with the GGUF merges (ignore_merges where
  llama.cpp sets it).
- "llama" (sentencepiece): llama.cpp prefixes a space (add_space_prefix) to every text piece, turns spaces into
  U+2581, then repeatedly merges the adjacent pair whose concatenation is the token with the highest score; bytes
  of what is left unknown become <0xXX> tokens. Here: BPE whose merge list is every (a, b) with a, b, a+b all in
  the vocabulary, ranked by the score of a+b, with byte fallback.
Control, user-defined and unknown tokens become added tokens: llama.cpp cuts them out of the raw text before
anything else, as the `tokenizers` added vocabulary does.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from llmq.errors import CorruptFile, UnsupportedType
from llmq.io.tokenizer_pre import PRE_SPECS, PreSpec

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_SPECIAL_KINDS = ("bos", "eos", "unk", "sep", "pad", "mask")
_ID_KEYS = {
    "bos": "tokenizer.ggml.bos_token_id",
    "eos": "tokenizer.ggml.eos_token_id",
    "unk": "tokenizer.ggml.unknown_token_id",
    "sep": "tokenizer.ggml.seperator_token_id",
    "pad": "tokenizer.ggml.padding_token_id",
    "mask": "tokenizer.ggml.mask_token_id",
}

# Token texts llama.cpp (llama_vocab::impl::load) turns into control tokens whatever the GGUF says: end-of-generation
# names always; end-of-turn and fill-in-the-middle names only while the GGUF has no id for that kind.
_EOG_NAMES = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>", "<end_of_turn>",
    "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>",
    "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>", "<\uff5cend\u2581of\u2581sentence\uff5c>", "[e~[",
})  # fmt: skip
_NAMES_IF_UNSET = {
    "tokenizer.ggml.eot_token_id": {"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
                                     "<|end_of_text|>", "<EOT>", "_<EOT>", "[EOT]",
                                     "<\uff5cend\u2581of\u2581sentence\uff5c>", "<end_of_utterance>"},
    "tokenizer.ggml.eom_token_id": {"<|eom_id|>"},
    "tokenizer.ggml.fim_pre_token_id": {"<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<\uff5cfim\u2581begin\uff5c>",
                                        "<PRE>", "\u2581<PRE>", "<|code_prefix|>", "<|prefix|>"},
    "tokenizer.ggml.fim_suf_token_id": {"<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<\uff5cfim\u2581hole\uff5c>",
                                        "<SUF>", "\u2581<SUF>", "<|code_suffix|>", "<|suffix|>"},
    "tokenizer.ggml.fim_mid_token_id": {"<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<\uff5cfim\u2581end\uff5c>",
                                        "<MID>", "\u2581<MID>", "<|code_middle|>", "<|middle|>"},
    "tokenizer.ggml.fim_pad_token_id": {"<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"},
    "tokenizer.ggml.fim_rep_token_id": {"<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"},
    "tokenizer.ggml.fim_sep_token_id": {"<|file_sep|>"},
}  # fmt: skip
_FORCED_USER_DEFINED = frozenset({"<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"})  # gpt-oss


def hf_tokenizer_files(gguf_metadata: Mapping[str, object]) -> dict[str, bytes]:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json for the tokenizer in `gguf_metadata`."""
    md = gguf_metadata
    model = md.get("tokenizer.ggml.model")
    tokens = _str_list(md.get("tokenizer.ggml.tokens"), "tokenizer.ggml.tokens")
    if not tokens:
        raise CorruptFile("GGUF has no tokenizer.ggml.tokens")
    types = _types(md, tokens)
    if model == "gpt2":
        pre = str(md.get("tokenizer.ggml.pre") or "default")
        spec = PRE_SPECS.get(pre)
        if spec is None:
            raise UnsupportedType(
                f"llmq cannot express llama.cpp's pre-tokenizer {pre!r} as a tokenizer.json"
            )
        tok = _bpe_tokenizer(tokens, _str_list(md.get("tokenizer.ggml.merges"), "merges"), spec)
        add_bos, add_eos = _flag(md, "add_bos", spec.add_bos), _flag(md, "add_eos", False)
        clean = spec.clean_spaces
    elif model == "llama":
        scores = md.get("tokenizer.ggml.scores")
        scores = [float(s) for s in scores] if scores is not None else [0.0] * len(tokens)
        if len(scores) < len(tokens):
            raise CorruptFile("tokenizer.ggml.scores is shorter than tokenizer.ggml.tokens")
        prefix = _flag(md, "add_space_prefix", True)
        tok = _spm_tokenizer(tokens, scores, _special_id(md, "unk", len(tokens)), prefix)
        add_bos, add_eos, clean = _flag(md, "add_bos", True), _flag(md, "add_eos", False), False
    else:
        raise UnsupportedType(f"GGUF tokenizer model {model!r} is not supported (only 'gpt2' and 'llama')")

    added = _add_special_tokens(tok, tokens, types)
    ids = {k: i for k in _SPECIAL_KINDS if (i := _special_id(md, k, len(tokens))) is not None}
    _post_processor(tok, tokens, ids, add_bos, add_eos)
    names = {f"{k}_token": tokens[i] for k, i in ids.items()}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **names,
        # transformers ignores (and warns about) space clean-up for BPE; llama.cpp only uses it when decoding
        "clean_up_tokenization_spaces": clean and model != "gpt2",
        "model_max_length": _context_length(md),
        "added_tokens_decoder": {str(i): _added_entry(tokens[i], special) for i, special in added},
    }
    # Flags the GGUF states are carried over as such (the post-processor already applies them), so that converting
    # back to GGUF gives the same keys; an absent flag stays absent.
    for key, name in (("add_bos_token", "add_bos_token"), ("add_eos_token", "add_eos_token"),
                      ("add_space_prefix", "add_prefix_space")):  # fmt: skip
        if md.get(f"tokenizer.ggml.{key}") is not None:
            config[name] = bool(md[f"tokenizer.ggml.{key}"])
    if isinstance(md.get("tokenizer.chat_template"), str):
        config["chat_template"] = md["tokenizer.chat_template"]
    return {
        "tokenizer.json": tok.to_str(pretty=False).encode("utf-8"),
        "tokenizer_config.json": _json_bytes(config),
        "special_tokens_map.json": _json_bytes(names),
    }


# ---------------------------------------------------------------- metadata helpers


def _str_list(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (str, bytes)):
        raise CorruptFile(f"{what} should be an array of strings")
    out = []
    for v in value:
        out.append(v.decode("utf-8", errors="replace") if isinstance(v, (bytes, bytearray)) else str(v))
    return out


def _types(md: Mapping[str, object], tokens: list[str]) -> list[int]:
    raw = md.get("tokenizer.ggml.token_type")
    types = [int(t) for t in raw] if raw is not None else [NORMAL] * len(tokens)  # type: ignore[union-attr]
    if len(types) < len(tokens):
        raise CorruptFile("tokenizer.ggml.token_type is shorter than tokenizer.ggml.tokens")
    types = types[: len(tokens)]
    forced = set(_EOG_NAMES)
    for key, names in _NAMES_IF_UNSET.items():
        if key not in md:
            forced |= names
    for i, text in enumerate(tokens):
        if text in _FORCED_USER_DEFINED:
            types[i] = USER_DEFINED
        elif text in forced and types[i] not in (CONTROL, USER_DEFINED, UNKNOWN):
            types[i] = CONTROL
    return types


def _flag(md: Mapping[str, object], name: str, default: bool) -> bool:
    value = md.get(f"tokenizer.ggml.{name}" if name == "add_space_prefix" else f"tokenizer.ggml.{name}_token")
    return bool(value) if value is not None else default


def _special_id(md: Mapping[str, object], kind: str, n: int) -> int | None:
    value = md.get(_ID_KEYS[kind])
    if value is None:
        return None
    value = int(value)  # type: ignore[call-overload]
    return value if 0 <= value < n else None  # llama.cpp ignores an out-of-range id too


def _context_length(md: Mapping[str, object]) -> int:
    arch = md.get("general.architecture")
    value = md.get(f"{arch}.context_length") if arch else None
    return int(value) if isinstance(value, int) and value > 0 else 1_000_000_000_000_000_019_884_624_838_656


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, ensure_ascii=False, indent=2) + "\n").encode("utf-8")


def _added_entry(content: str, special: bool) -> dict[str, Any]:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": special}  # fmt: skip


def _vocab(tokens: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, text in enumerate(tokens):
        if text in vocab:  # llama.cpp refuses such a file (token_to_id would lose an id)
            raise CorruptFile(f"GGUF vocabulary lists token {text!r} twice (ids {vocab[text]} and {i})")
        vocab[text] = i
    return vocab


# ---------------------------------------------------------------- tokenizer builders


def _bpe_tokenizer(tokens: list[str], merges: list[str], spec: PreSpec):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = _vocab(tokens)
    pairs: list[tuple[str, str]] = []
    for m in merges:
        cut = m.find(
            " ", 1
        )  # as llama.cpp: the first space after the first character separates the two parts
        if cut < 0:
            raise CorruptFile(f"malformed merge {m!r} in tokenizer.ggml.merges")
        a, b = m[:cut], m[cut + 1 :]
        # `tokenizers` needs both parts and their concatenation in the vocabulary; llama.cpp would merge anyway and
        # then spell the result as bytes, which a well-formed vocabulary never asks for.
        if a in vocab and b in vocab and a + b in vocab:
            pairs.append((a, b))
    bpe = models.BPE(vocab=vocab, merges=pairs, ignore_merges=spec.ignore_merges, fuse_unk=False)
    tok = Tokenizer(bpe)
    splits = [pre_tokenizers.Split(Regex(rx), behavior="isolated") for rx in spec.regexes]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.pre_tokenizer = pre_tokenizers.Sequence([*splits, byte_level])
    tok.decoder = decoders.ByteLevel()
    return tok


def spm_merges(
    tokens: Sequence[str], scores: Sequence[float], vocab: Mapping[str, int]
) -> list[tuple[str, str]]:
    """Every pair (a, b) whose parts and concatenation are tokens, best score of a+b first (ties: lower id)."""
    ranked: list[tuple[float, int, int, str, str]] = []
    for i, text in enumerate(tokens):
        for cut in range(1, len(text)):
            a, b = text[:cut], text[cut:]
            if a in vocab and b in vocab:
                ranked.append((-scores[i], i, cut, a, b))
    ranked.sort()
    return [(a, b) for _, _, _, a, b in ranked]


def _spm_tokenizer(tokens: list[str], scores: list[float], unk_id: int | None, add_space_prefix: bool):
    from tokenizers import Tokenizer, decoders, models, normalizers

    vocab = _vocab(tokens)
    merges = spm_merges(tokens, scores, vocab)
    unk = tokens[unk_id] if unk_id is not None else None
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    escape = normalizers.Replace(" ", "\u2581")
    tok.normalizer = (
        normalizers.Sequence([normalizers.Prepend("\u2581"), escape]) if add_space_prefix else escape
    )
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    return tok


def _add_special_tokens(tok, tokens: list[str], types: list[int]) -> list[tuple[int, bool]]:
    """Register control/user-defined/unknown tokens as added tokens (matched on raw text, never normalized)."""
    from tokenizers import AddedToken

    added: list[tuple[int, bool]] = []
    special, user = [], []
    for i, t in enumerate(types):
        if t in (CONTROL, UNKNOWN, USER_DEFINED):
            is_special = t != USER_DEFINED
            added.append((i, is_special))
            entry = AddedToken(tokens[i], single_word=False, lstrip=False, rstrip=False, normalized=False,
                               special=is_special)  # fmt: skip
            (special if is_special else user).append(entry)
    if special:
        tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)
    return added


def _post_processor(tok, tokens: list[str], ids: dict[str, int], add_bos: bool, add_eos: bool) -> None:
    from tokenizers import processors

    bos = tokens[ids["bos"]] if add_bos and "bos" in ids else None
    eos = tokens[ids["eos"]] if add_eos and "eos" in ids else None
    if bos is None and eos is None:
        return
    first = [t for t in (bos, "$A", eos) if t]
    second = [f"{t}:1" for t in (bos, "$B", eos) if t]
    specials = [(t, ids[k]) for k, t in (("bos", bos), ("eos", eos)) if t]
    tok.post_processor = processors.TemplateProcessing(
        single=" ".join(first), pair=" ".join(first + second), special_tokens=specials
    )
