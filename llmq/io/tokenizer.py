"""Tokenizer conversion between Hugging Face directories and GGUF metadata.

HF -> GGUF: `gguf_tokenizer_kv(hf_dir, config)` returns the `tokenizer.*` key/values that llama.cpp's
convert_hf_to_gguf.py (as vendored in llama-cpp-python 0.3.36) writes for the same checkpoint.
GGUF -> HF: `hf_tokenizer_files(metadata)` (in tokenizer_hf.py) builds tokenizer.json & co that tokenize exactly as
llama.cpp does with that GGUF.

No torch or transformers here: tokenizer.json is read with the `tokenizers` package, tokenizer.model with
`sentencepiece`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf

from llmq.errors import BadInput, CorruptFile, UnsupportedArchitecture, require
from llmq.io.tokenizer_hf import hf_tokenizer_files
from llmq.io.tokenizer_pre import CHECK_TEXT, PRE_BY_HASH, check_hash, pre_from_regexes
from llmq.io.tokenizer_special import (
    ADD_KEYS,
    ID_KEYS,
    SpecialVocab,
    chat_template_kv,
    load_special_vocab,
    read_json,
)

__all__ = ["gguf_tokenizer_kv", "hf_tokenizer_files", "detect_pre"]

T = gguf.TokenType
V = gguf.GGUFValueType
KV = list[tuple[str, Any, "gguf.GGUFValueType | None"]]


class _Writer:
    """Ordered key/values; a later write replaces the value in place, as GGUFWriter does for a repeated key."""

    def __init__(self) -> None:
        self.items: dict[str, tuple[Any, gguf.GGUFValueType]] = {}

    def put(self, key: str, value: Any, vtype: gguf.GGUFValueType) -> None:
        self.items[key] = (value, vtype)

    def special_vocab(self, sv: SpecialVocab) -> None:
        if sv.merges:
            self.put("tokenizer.ggml.merges", sv.merges, V.ARRAY)
        for kind, tid in sv.ids.items():
            if kind in ID_KEYS:
                self.put(ID_KEYS[kind], tid, V.UINT32)
        for kind, flag in sv.add.items():
            if kind in ADD_KEYS:
                self.put(ADD_KEYS[kind], flag, V.BOOL)
        if sv.chat_template is not None:
            for key, value in chat_template_kv(sv.chat_template):
                self.put(key, value, V.ARRAY if isinstance(value, list) else V.STRING)
        if sv.lowercase is not None:
            self.put("tokenizer.ggml.normalizer.lowercase", sv.lowercase, V.BOOL)
        if sv.strip_accents is not None:
            self.put("tokenizer.ggml.normalizer.strip_accents", sv.strip_accents, V.BOOL)

    def result(self) -> KV:
        return [(k, v, t) for k, (v, t) in self.items.items()]


def gguf_tokenizer_kv(hf_dir: Path, config: dict) -> KV:
    """All `tokenizer.*` GGUF keys for the HF checkpoint in `hf_dir` (config = its config.json)."""
    hf_dir = Path(hf_dir)
    family = _family(config)
    w = _Writer()
    has_spm = (hf_dir / "tokenizer.model").is_file()
    has_json = (hf_dir / "tokenizer.json").is_file()
    if not has_spm and not has_json:
        raise BadInput(f"{hf_dir} has no tokenizer (tokenizer.json or tokenizer.model)")
    if family == "llama":
        tc_path = hf_dir / "tokenizer_config.json"
        tc = read_json(tc_path) if tc_path.is_file() else {}
        if isinstance(tc.get("add_prefix_space"), bool):
            w.put("tokenizer.ggml.add_space_prefix", tc["add_prefix_space"], V.BOOL)
        if has_spm:
            _spm_vocab(w, hf_dir, config)
        elif _is_llama_hf_json(hf_dir):
            _llama_hf_vocab(w, hf_dir, tc)
        else:
            _gpt2_vocab(w, hf_dir, config)
        vocab_size = config.get("vocab_size", 32000)
        if vocab_size == 32016:  # CodeLlama: only eot has a GGUF key among its infill tokens
            sv = load_special_vocab(hf_dir, types=("prefix", "suffix", "middle", "eot"))
            sv.ids = {"prefix": 32007, "suffix": 32008, "middle": 32009, "eot": 32010} | sv.ids
            w.special_vocab(sv)
        if vocab_size == 49152:  # the reference's "granite small" rule, which also catches SmolLM/SmolLM2
            w.put("tokenizer.ggml.add_bos_token", False, V.BOOL)
    elif family == "qwen":
        _spm_vocab(w, hf_dir, config) if has_spm else _gpt2_vocab(w, hf_dir, config)
    elif family == "gemma":
        _spm_vocab(w, hf_dir, config)
        sv = load_special_vocab(hf_dir, types=("prefix", "suffix", "middle", "fsep", "eot"))
        sv.ids = {"prefix": 67, "suffix": 69, "middle": 68, "fsep": 70, "eot": 107} | sv.ids
        sv.chat_template = None
        w.special_vocab(sv)
        w.put("tokenizer.ggml.add_space_prefix", False, V.BOOL)
    elif family == "gemma2" or (family == "gemma3" and has_spm):
        _spm_vocab(w, hf_dir, config)
        w.put("tokenizer.ggml.add_space_prefix", False, V.BOOL)
    else:  # gemma3 without tokenizer.model
        _gpt2_vocab(w, hf_dir, config)
    return w.result()


def _family(config: dict) -> str:
    """How convert_hf_to_gguf.py's model class picks the vocabulary: the family's ``tokenizer`` in llmq.archs."""
    from llmq.archs import lookup

    archs = config.get("architectures") or []
    family = lookup(config)
    if family is not None:
        return family.tokenizer
    if "MixtralForCausalLM" in archs or config.get("model_type") == "mixtral":
        return "llama"  # how convert_hf_to_gguf.py reads Mixtral's vocabulary; its experts are not in llmq.archs yet
    raise UnsupportedArchitecture(
        f"no tokenizer conversion for architecture {archs or config.get('model_type')}"
    )


# ---------------------------------------------------------------- sentencepiece (tokenizer.model)


def _spm_vocab(w: _Writer, hf_dir: Path, config: dict) -> None:
    spm = require("sentencepiece", "spm")
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(hf_dir / "tokenizer.model"))
    except (OSError, RuntimeError) as e:
        raise CorruptFile(f"cannot load {hf_dir / 'tokenizer.model'}: {e}") from e
    n = config.get("vocab_size_per_layer_input") or config.get("vocab_size") or sp.vocab_size()
    tokens: list[str] = [f"[PAD{i}]" for i in range(n)]
    scores: list[float] = [-10000.0] * n
    types: list[int] = [int(T.UNUSED)] * n
    for i in range(min(n, sp.vocab_size())):
        tokens[i] = sp.IdToPiece(i)
        scores[i] = float(sp.GetScore(i))
        types[i] = int(_spm_type(sp, i))
    if (hf_dir / "added_tokens.json").is_file():
        for text, i in read_json(hf_dir / "added_tokens.json").items():
            if isinstance(i, int) and 0 <= i < n:
                tokens[i], scores[i], types[i] = text, -1000.0, int(T.USER_DEFINED)
    if (hf_dir / "tokenizer_config.json").is_file():
        decoder = read_json(hf_dir / "tokenizer_config.json").get("added_tokens_decoder") or {}
        for key, data in decoder.items():
            i, text = int(key), data["content"]
            if i >= n:
                continue
            if data.get("special") or _looks_special(text):
                types[i] = int(T.CONTROL)
            else:
                text = text.replace("\u2581", " ")  # llama.cpp matches user-defined tokens on raw text
                types[i] = int(T.USER_DEFINED)
            scores[i], tokens[i] = -1000.0, text
    w.put("tokenizer.ggml.model", "llama", V.STRING)
    w.put("tokenizer.ggml.pre", "default", V.STRING)
    w.put("tokenizer.ggml.tokens", tokens, V.ARRAY)
    w.put("tokenizer.ggml.scores", scores, V.ARRAY)
    w.put("tokenizer.ggml.token_type", types, V.ARRAY)
    w.special_vocab(load_special_vocab(hf_dir, n_vocab=n))


def _spm_type(sp, i: int) -> gguf.TokenType:
    if sp.IsUnknown(i):
        return T.UNKNOWN
    if sp.IsControl(i):
        return T.CONTROL
    if sp.IsUnused(i):
        return T.UNUSED
    if sp.IsByte(i):
        return T.BYTE
    return T.NORMAL


def _looks_special(text: str) -> bool:
    """The reference's does_token_look_special: added tokens some models forget to flag as special."""
    return (
        text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (text.startswith("<|") and text.endswith("|>"))
        or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))
        or (text.startswith("<unused") and text.endswith(">"))
    )


# ---------------------------------------------------------------- tokenizer.json


def _load_tokenizers(hf_dir: Path):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    except Exception as e:  # the tokenizers package raises a bare Exception on malformed files
        raise CorruptFile(f"cannot load {hf_dir / 'tokenizer.json'}: {e}") from e


def _is_llama_hf_json(hf_dir: Path) -> bool:
    """The reference's LlamaHfVocab test: an SPM-style BPE (byte fallback, Sequence decoder) without .model file."""
    if not (hf_dir / "tokenizer.json").is_file():
        return False
    tj = read_json(hf_dir / "tokenizer.json")
    model = tj.get("model") or {}
    if (
        model.get("type") == "BPE"
        and model.get("ignore_merges", False)
        and not model.get("byte_fallback", True)
    ):
        return False
    return (
        model.get("type") == "BPE"
        and bool(model.get("byte_fallback", False))
        and (tj.get("decoder") or {}).get("type") == "Sequence"
    )


def _llama_hf_vocab(w: _Writer, hf_dir: Path, tc: dict) -> None:
    """An SPM-style BPE tokenizer.json, as gguf-py's LlamaHfVocab exports it (every score is -1000)."""
    tok = _load_tokenizers(hf_dir)
    base = tok.get_vocab(with_added_tokens=False)
    n_base = len(base)
    reverse = {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()}
    special_texts = _special_token_texts(tc, hf_dir)
    added = sorted((i, a) for i, a in tok.get_added_tokens_decoder().items() if i >= n_base)
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n_base):
        text = reverse[i]
        tokens.append(text)
        if _is_byte_token(text):
            types.append(int(T.BYTE))
        else:
            types.append(int(T.CONTROL if text in special_texts else T.NORMAL))
    for _, a in added:
        tokens.append(a.content)
        types.append(int(T.CONTROL if a.content in special_texts else T.USER_DEFINED))
    w.put("tokenizer.ggml.model", "llama", V.STRING)
    w.put("tokenizer.ggml.pre", "default", V.STRING)
    w.put("tokenizer.ggml.tokens", tokens, V.ARRAY)
    w.put("tokenizer.ggml.scores", [-1000.0] * len(tokens), V.ARRAY)
    w.put("tokenizer.ggml.token_type", types, V.ARRAY)
    w.special_vocab(load_special_vocab(hf_dir, n_vocab=len(tokens)))


def _is_byte_token(text: str) -> bool:
    return len(text) == 6 and text.startswith("<0x") and text.endswith(">") and _is_hex(text[3:5])


def _is_hex(s: str) -> bool:
    return all(c in "0123456789abcdefABCDEF" for c in s)


def _special_token_texts(tc: dict, hf_dir: Path) -> set[str]:
    """transformers' all_special_tokens: the named special tokens plus additional_special_tokens."""
    sources = [tc]
    if (hf_dir / "special_tokens_map.json").is_file():
        sources.append(read_json(hf_dir / "special_tokens_map.json"))
    out: set[str] = set()
    for src in sources:
        for key in (
            "bos_token",
            "eos_token",
            "unk_token",
            "sep_token",
            "pad_token",
            "cls_token",
            "mask_token",
        ):
            out |= _token_texts(src.get(key))
        for extra in src.get("additional_special_tokens") or []:
            out |= _token_texts(extra)
    return out


def _token_texts(entry: Any) -> set[str]:
    if isinstance(entry, str):
        return {entry}
    if isinstance(entry, dict) and isinstance(entry.get("content"), str):
        return {entry["content"]}
    return set()


def _gpt2_vocab(w: _Writer, hf_dir: Path, config: dict) -> None:
    tok = _load_tokenizers(hf_dir)
    vocab = tok.get_vocab(with_added_tokens=True)
    n = config.get("vocab_size", len(vocab))
    if vocab and max(vocab.values()) >= n:
        raise CorruptFile(f"tokenizer has ids up to {max(vocab.values())} but vocab_size is {n}")
    reverse = {i: t for t, i in vocab.items()}
    added = tok.get_added_tokens_decoder()
    added_texts = {a.content for a in added.values()}
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(int(T.UNUSED))
            continue
        text = reverse[i]
        if text in added_texts and i in added:
            if not added[i].normalized:
                # llama.cpp matches control/user tokens on pre-normalized text: round-trip through the tokenizer
                text = tok.decode(tok.encode(text, add_special_tokens=False).ids, skip_special_tokens=False)
            if added[i].special or _looks_special(text):
                types.append(int(T.CONTROL))
            else:
                text = text.replace("\u2581", " ")
                types.append(int(T.USER_DEFINED))
        else:
            types.append(int(T.NORMAL))
        tokens.append(text)
    w.put("tokenizer.ggml.model", "gpt2", V.STRING)
    w.put("tokenizer.ggml.pre", detect_pre(hf_dir, tok), V.STRING)
    w.put("tokenizer.ggml.tokens", tokens, V.ARRAY)
    w.put("tokenizer.ggml.token_type", types, V.ARRAY)
    w.special_vocab(load_special_vocab(hf_dir, load_merges=True))


def detect_pre(hf_dir: Path, tok=None) -> str:
    """tokenizer.ggml.pre for a BPE tokenizer.json: the reference's fingerprint table first, then the split regexes
    found in the tokenizer's pre_tokenizer."""
    tok = tok or _load_tokenizers(hf_dir)
    for with_special in (True, False):
        name = PRE_BY_HASH.get(check_hash(tok.encode(CHECK_TEXT, add_special_tokens=with_special).ids))
        if name:
            return name
    regexes = _pre_tokenizer_regexes(read_json(hf_dir / "tokenizer.json").get("pre_tokenizer"))
    name = pre_from_regexes(regexes) if regexes else None
    if name is None:
        raise UnsupportedArchitecture(
            f"unknown BPE pre-tokenizer in {hf_dir / 'tokenizer.json'} (neither its fingerprint nor its split "
            "regexes are known to llama.cpp)"
        )
    return name


def _pre_tokenizer_regexes(pre: Any) -> list[str] | None:
    """The split regexes of a byte-level pre_tokenizer, in order; None if it is not one llama.cpp can express."""
    from llmq.io.tokenizer_pre import GPT2

    if not isinstance(pre, dict):
        return None
    items = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    regexes: list[str] = []
    byte_level = False
    for item in items or []:
        kind = item.get("type")
        if kind == "ByteLevel":
            byte_level = True
            if item.get("use_regex", True):
                regexes.append(GPT2)
        elif kind == "Split" and not byte_level:
            pattern = item.get("pattern") or {}
            if "Regex" not in pattern or item.get("behavior") not in ("Isolated", "isolated"):
                return None
            regexes.append(pattern["Regex"])
        elif kind == "Digits" and not byte_level:
            regexes.append(r"\p{N}" if item.get("individual_digits") else r"\p{N}+")
        else:
            return None
    return regexes if byte_level else None
