"""Tokenizer conversion: HF -> GGUF keys as llama.cpp's converter writes them, GGUF -> HF files that tokenize
exactly as llama.cpp does (llama-cpp-python is the reference), and round trips through both."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from llmq.errors import BadInput, CorruptFile, UnsupportedArchitecture, UnsupportedType
from llmq.io.base import TensorInfo
from llmq.io.gguf import GGUFFileWriter
from llmq.io.tokenizer import detect_pre, gguf_tokenizer_kv, hf_tokenizer_files
from llmq.io.tokenizer_pre import CHECK_TEXT, GPT2, LLAMA3, PRE_BY_HASH, QWEN2, check_hash, pre_from_regexes
from llmq.io.tokenizer_special import chat_template_kv, load_special_vocab
from tests.helpers import pydocs_text

TRICKY = [
    "Hello\n\nWorld",
    "a  b   c\n\n\n  d\t\te  ",
    " \n \n = Robert Boulter = \n \n",
    "3.14159 and 1234567 and ２０２４ ü ñ 😀 日本語 한국어 кириллица",
    "I've 'RE we'Ll it's DON'T",
    "  leading spaces",
    "trailing spaces   ",
    "\n\n",
    "x\r\n\r\ny\u00a0z\u3000w",
    "",
    "    def f(x):\n        return x**2  # comment\n",
]


# Characters where regex engines and Unicode tables tend to disagree: odd whitespace, marks, digits of other
# scripts, emoji sequences, contractions, runs of spaces and newlines.
_FUZZ_POOL = [*"abcXYZ019 '\n\t\r.,!?-_=", "\u00a0", "\u3000", "\u2028", "\u2029", "\u200b", "\x0b", "\x0c",
              "\x1c", "\x1f", "\x85", "é", "É", "ß", "ǅ", "\u0301", "\u0915\u093f", "日", "한", "ع", "٣", "²", "½",
              "Ⅻ", "😀", "👍🏽", "\U0001F926\u200d\u2642\ufe0f", "\ufffd", "\u00ad", "𝔘", "ｈ", "'s", "'RE", "'ll",
              "   ", "\n\n", " \n", "\r\n"]  # fmt: skip


def _random_texts(n: int, seed: int) -> list[str]:
    import random

    rng = random.Random(seed)
    return ["".join(rng.choice(_FUZZ_POOL) for _ in range(rng.randint(1, 25))) for _ in range(n)]


# ---------------------------------------------------------------- helpers


def _llama_cpp():
    return pytest.importorskip("llama_cpp", reason="needs llama-cpp-python")


def _vocab_model(path: Path):
    return _llama_cpp().Llama(model_path=str(path), vocab_only=True, verbose=False)


def _write_vocab_gguf(path: Path, kv, n_vocab: int) -> Path:
    """A tiny llama GGUF carrying the given tokenizer keys: enough for llama.cpp's vocab_only load."""
    w = GGUFFileWriter(path, "llama")
    hparams = {"context_length": 512, "embedding_length": 8, "block_count": 1, "feed_forward_length": 16,
               "attention.head_count": 1}  # fmt: skip
    for key, value in hparams.items():
        w.add(f"llama.{key}", value)
    w.add("llama.attention.layer_norm_rms_epsilon", 1e-5)
    for key, value, vtype in kv:
        w.add(key, value, vtype)
    w.plan([TensorInfo("token_embd.weight", "F32", (n_vocab, 8), n_vocab * 8 * 4)])
    w.write("token_embd.weight", np.zeros((n_vocab, 8), np.float32))
    w.close()
    return path


def _write_files(directory: Path, files: dict[str, bytes]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return directory


def _auto(directory: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))


def _first_diff(a: list[int], b: list[int]) -> str:
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"lengths {len(a)} vs {len(b)}, first difference at {i}: {a[i : i + 6]} vs {b[i : i + 6]}"


def _metadata(kv) -> dict:
    return {k: v for k, v, _ in kv}


# ---------------------------------------------------------------- SmolLM2: the real model


@pytest.fixture(scope="session")
def smol_metadata(smollm2_gguf_path: Path) -> dict:
    from llmq.io import open_checkpoint

    with open_checkpoint(smollm2_gguf_path) as r:
        return dict(r.metadata)


@pytest.fixture(scope="session")
def smol_tok_dir(smol_metadata, tmp_path_factory) -> Path:
    d = _write_files(tmp_path_factory.mktemp("smol_tok"), hf_tokenizer_files(smol_metadata))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152,
              "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}  # fmt: skip
    (d / "config.json").write_text(json.dumps(config))
    return d


@pytest.fixture(scope="session")
def smol_llm(smollm2_gguf_path: Path):
    return _vocab_model(smollm2_gguf_path)


@pytest.mark.slow
@pytest.mark.llamacpp
def test_smollm2_full_wikitext_ids_equal_llama_cpp(smol_tok_dir, smol_llm, wikitext):
    ref = smol_llm.tokenize(wikitext.encode("utf-8"), add_bos=False, special=True)
    ours = _auto(smol_tok_dir)(wikitext, add_special_tokens=False)["input_ids"]
    assert len(ref) > 250_000
    assert ours == ref, _first_diff(ours, ref)


@pytest.mark.slow
@pytest.mark.llamacpp
@pytest.mark.parametrize("add_bos", [False, True])
def test_smollm2_tricky_texts_and_specials(smol_tok_dir, smol_llm, add_bos):
    tok = _auto(smol_tok_dir)
    texts = [*TRICKY, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "a<|endoftext|>b"]
    for text in texts:
        ref = smol_llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)
        ours = tok(text, add_special_tokens=add_bos)["input_ids"]
        assert ours == ref, (text, _first_diff(ours, ref))
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


@pytest.mark.slow
@pytest.mark.llamacpp
def test_smollm2_random_unicode(smol_tok_dir, smol_llm):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(smol_tok_dir / "tokenizer.json"))
    for text in _random_texts(800, seed=0):
        ref = smol_llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        assert tok.encode(text, add_special_tokens=False).ids == ref, repr(text)


@pytest.mark.slow
def test_smollm2_tokenizer_config(smol_tok_dir, smol_metadata):
    tok = _auto(smol_tok_dir)
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")  # fmt: skip
    assert tok.chat_template == smol_metadata["tokenizer.chat_template"]
    cfg = json.loads((smol_tok_dir / "tokenizer_config.json").read_text())
    assert cfg["add_bos_token"] is False and cfg["add_prefix_space"] is False
    assert cfg["model_max_length"] == smol_metadata["llama.context_length"]
    assert len(cfg["added_tokens_decoder"]) == 17
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n")


@pytest.mark.slow
def test_smollm2_back_to_gguf_keys_are_identical(smol_tok_dir, smol_metadata):
    """GGUF -> HF -> GGUF: every tokenizer key comes back with the same value, `pre` found by its fingerprint."""
    config = json.loads((smol_tok_dir / "config.json").read_text())
    kv = gguf_tokenizer_kv(smol_tok_dir, config)
    ours = _metadata(kv)
    theirs = {k: v for k, v in smol_metadata.items() if k.startswith("tokenizer.")}
    assert set(ours) == set(theirs)
    for key in theirs:
        assert ours[key] == theirs[key], key
    # `pre` came from the reference's fingerprint table, not from the regex fallback
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(smol_tok_dir / "tokenizer.json"))
    assert PRE_BY_HASH[check_hash(tok.encode(CHECK_TEXT).ids)] == "smollm"


# ---------------------------------------------------------------- tiny BPE tokenizers, one per pre-tokenizer family


def _train_bpe(pre: str) -> str:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    seq = {
        "llama-bpe": [pre_tokenizers.Split(Regex(LLAMA3.replace(
            "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])", "(?i:'s|'t|'re|'ve|'m|'ll|'d)")),
            behavior="isolated"), byte_level],
        "qwen2": [pre_tokenizers.Split(Regex(QWEN2), behavior="isolated"), byte_level],
        "smollm": [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)],
        "gpt-2": [pre_tokenizers.ByteLevel(add_prefix_space=False)],
    }[pre]  # fmt: skip
    tok = Tokenizer(models.BPE(ignore_merges=pre == "llama-bpe"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(seq)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)  # fmt: skip
    text = pydocs_text()
    tok.train_from_iterator([text[i : i + 4000] for i in range(0, 120_000, 4000)], trainer=trainer)
    return tok.to_str()


def _bpe_dir(root: Path, pre: str) -> tuple[Path, dict]:
    d = root / pre
    d.mkdir()
    (d / "tokenizer.json").write_text(_train_bpe(pre))
    tc = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
          "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}  # fmt: skip
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    config = {"architectures": ["LlamaForCausalLM"], "vocab_size": 704}
    (d / "config.json").write_text(json.dumps(config))
    return d, config


@pytest.mark.llamacpp
@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "smollm", "gpt-2"])
def test_bpe_round_trip(tmp_path, wikitext, pre):
    from tokenizers import Tokenizer

    src, config = _bpe_dir(tmp_path, pre)
    kv = gguf_tokenizer_kv(src, config)
    md = _metadata(kv)
    assert md["tokenizer.ggml.model"] == "gpt2" and md["tokenizer.ggml.pre"] == pre
    original = Tokenizer.from_file(str(src / "tokenizer.json"))
    vocab = original.get_vocab()
    assert len(md["tokenizer.ggml.tokens"]) == 704
    assert md["tokenizer.ggml.tokens"][:700] == sorted(vocab, key=vocab.get)
    assert md["tokenizer.ggml.tokens"][700:] == [f"[PAD{i}]" for i in range(700, 704)]
    assert (
        md["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 1]
        and md["tokenizer.ggml.token_type"][700:] == [5] * 4
    )
    merges = json.loads((src / "tokenizer.json").read_text())["model"]["merges"]
    assert md["tokenizer.ggml.merges"] == [" ".join(m) for m in merges]
    assert (md["tokenizer.ggml.bos_token_id"], md["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert md["tokenizer.chat_template"].startswith("{% for m in messages")

    llm = _vocab_model(_write_vocab_gguf(tmp_path / "v.gguf", kv, 704))
    out = _auto(_write_files(tmp_path / "out", hf_tokenizer_files(md)))
    for text in [wikitext[:40_000], *TRICKY, "<|im_start|>user\nhi<|im_end|>", *_random_texts(200, seed=2)]:
        ref = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        assert original.encode(text, add_special_tokens=False).ids == ref, (pre, text[:40])
        ours = out(text, add_special_tokens=False)["input_ids"]
        assert ours == ref, (pre, text[:40], _first_diff(ours, ref))
    # and the HF files carry the same vocabulary, merges and special tokens
    rebuilt = json.loads(out.backend_tokenizer.to_str())
    assert rebuilt["model"]["vocab"] == {t: i for i, t in enumerate(md["tokenizer.ggml.tokens"])}
    assert [" ".join(m) for m in rebuilt["model"]["merges"]] == md["tokenizer.ggml.merges"]
    assert {a["content"] for a in rebuilt["added_tokens"]} == {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}


def test_llama3_style_adds_bos(tmp_path):
    """A TemplateProcessing post-processor that prepends bos means add_bos_token = True on both sides."""
    from tokenizers import Tokenizer, processors

    src, config = _bpe_dir(tmp_path, "llama-bpe")
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|im_start|> $A", pair="<|im_start|> $A <|im_start|>:1 $B:1",
                                      special_tokens=[("<|im_start|>", 1)]),
    ])  # fmt: skip
    tok.save(str(src / "tokenizer.json"))
    md = _metadata(gguf_tokenizer_kv(src, config))
    assert md["tokenizer.ggml.add_bos_token"] is True
    out = _auto(_write_files(tmp_path / "out", hf_tokenizer_files(md)))
    assert out("hello world")["input_ids"][0] == 1
    assert out("hello world")["input_ids"] == tok.encode("hello world").ids


# ---------------------------------------------------------------- sentencepiece ("llama") vocabularies


def _train_spm(model_type: str = "bpe") -> bytes:
    spm = pytest.importorskip("sentencepiece")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(pydocs_text()[:150_000].splitlines()), model_writer=buf, vocab_size=800,
        model_type=model_type, byte_fallback=True, character_coverage=0.9995, split_digits=True,
        allow_whitespace_only_pieces=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        user_defined_symbols=["<|user|>"], minloglevel=2, max_sentence_length=100_000,
    )  # fmt: skip
    return buf.getvalue()


@pytest.fixture(scope="module")
def spm_model() -> bytes:
    return _train_spm()


def _spm_dir(root: Path, model: bytes, arch: str = "LlamaForCausalLM") -> tuple[Path, dict]:
    root.mkdir(parents=True, exist_ok=True)
    (root / "tokenizer.model").write_bytes(model)
    specials = {"0": "<unk>", "1": "<s>", "2": "</s>"}
    tc = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
          "add_bos_token": True, "add_eos_token": False, "chat_template": "{{ messages[0]['content'] }}",
          "added_tokens_decoder": {k: {"content": v, "special": True} for k, v in specials.items()}}  # fmt: skip
    (root / "tokenizer_config.json").write_text(json.dumps(tc))
    config = {"architectures": [arch], "vocab_size": 800, "bos_token_id": 1, "eos_token_id": 2}
    (root / "config.json").write_text(json.dumps(config))
    return root, config


def test_spm_to_gguf_keys(tmp_path, spm_model):
    import sentencepiece as spm

    src, config = _spm_dir(tmp_path / "src", spm_model)
    md = _metadata(gguf_tokenizer_kv(src, config))
    sp = spm.SentencePieceProcessor(model_proto=spm_model)
    assert md["tokenizer.ggml.model"] == "llama" and md["tokenizer.ggml.pre"] == "default"
    assert md["tokenizer.ggml.tokens"] == [sp.IdToPiece(i) for i in range(800)]
    types = md["tokenizer.ggml.token_type"]
    # added_tokens_decoder marks <unk> special, so the reference writes it as control; user-defined reads as normal
    assert types[:4] == [3, 3, 3, 1]
    assert types.count(6) == 256  # byte fallback pieces
    scores = md["tokenizer.ggml.scores"]
    assert scores[:3] == [-1000.0] * 3  # re-scored from added_tokens_decoder, as the reference does
    assert scores[300] == pytest.approx(sp.GetScore(300))
    assert (md["tokenizer.ggml.bos_token_id"], md["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert md["tokenizer.ggml.add_bos_token"] is True and md["tokenizer.ggml.add_eos_token"] is False
    assert "tokenizer.ggml.merges" not in md and "tokenizer.ggml.add_space_prefix" not in md


@pytest.mark.llamacpp
@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_spm_round_trip_matches_llama_cpp(tmp_path, wikitext, spm_model, model_type):
    import sentencepiece as spm

    model = spm_model if model_type == "bpe" else _train_spm("unigram")
    src, config = _spm_dir(tmp_path / "src", model)
    kv = gguf_tokenizer_kv(src, config)
    llm = _vocab_model(_write_vocab_gguf(tmp_path / "v.gguf", kv, 800))
    # metadata as numpy arrays (what some GGUF readers return) gives the same files
    files = hf_tokenizer_files(_metadata(kv))
    as_numpy = {
        k: np.asarray(v) if isinstance(v, list) and not isinstance(v[0], str) else v for k, v, _ in kv
    }
    assert hf_tokenizer_files(as_numpy) == files
    out = _auto(_write_files(tmp_path / "out", files))
    sp = spm.SentencePieceProcessor(model_proto=model)
    for text in [wikitext[:100_000], *TRICKY, "x<|user|>y <s> z</s>", *_random_texts(300, seed=1)]:
        ref = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        ours = out(text)["input_ids"]
        assert ours == ref, (model_type, text[:40], _first_diff(ours, ref))
        if model_type == "bpe" and "<" not in text:  # sentencepiece itself knows no added tokens
            assert ours == [1, *sp.encode(text)]
    assert out.decode(out("Hello  world\n")["input_ids"], skip_special_tokens=True) == "Hello  world\n"
    # GGUF -> HF -> GGUF: the rebuilt tokenizer.model keeps pieces, scores and types, so every key comes back
    assert "tokenizer.model" in files
    again = gguf_tokenizer_kv(tmp_path / "out", config)
    assert _metadata(again) == _metadata(kv)


@pytest.mark.llamacpp
def test_spm_without_space_prefix(tmp_path, spm_model):
    """Gemma-family vocabularies: no dummy prefix space, on both sides."""
    src, config = _spm_dir(tmp_path / "src", spm_model, arch="Gemma2ForCausalLM")
    kv = gguf_tokenizer_kv(src, config)
    md = _metadata(kv)
    assert md["tokenizer.ggml.add_space_prefix"] is False
    llm = _vocab_model(_write_vocab_gguf(tmp_path / "v.gguf", kv, 800))
    out = _auto(_write_files(tmp_path / "out", hf_tokenizer_files(md)))
    for text in ["Hello world", " two", "a\n\nb  c"]:
        assert out(text)["input_ids"] == llm.tokenize(text.encode(), add_bos=True, special=True), text


# ---------------------------------------------------------------- detection and special-vocab details


def test_pre_detection_by_regex():
    assert pre_from_regexes([GPT2]) == "gpt-2"
    assert pre_from_regexes([r"\p{N}", GPT2]) == "smollm"
    assert pre_from_regexes([QWEN2]) == "qwen2"
    original_llama3 = LLAMA3.replace("(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])",
                                     "(?i:'s|'t|'re|'ve|'m|'ll|'d)")  # fmt: skip
    assert pre_from_regexes([original_llama3]) == "llama-bpe"
    assert pre_from_regexes([r"\w+"]) is None


def test_unknown_pre_tokenizer_is_refused(tmp_path):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\w+"), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(use_regex=False)])  # fmt: skip
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(UnsupportedArchitecture, match="pre-tokenizer"):
        detect_pre(tmp_path)


def test_special_vocab_post_processors(tmp_path):
    tj = {"model": {"type": "BPE", "merges": [["a b", "c"], ["d", "e"]]},
          "added_tokens": [{"id": 5, "content": "<s>"}, {"id": 6, "content": "</s>"}],
          "post_processor": {"type": "TemplateProcessing",
                             "single": [{"SpecialToken": {"id": "<s>"}}, {"Sequence": {"id": "A"}}],
                             "pair": [{"SpecialToken": {"id": "<s>"}}, {"Sequence": {"id": "A"}},
                                      {"Sequence": {"id": "B"}}]}}  # fmt: skip
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                                "add_bos_token": False}))  # fmt: skip
    sv = load_special_vocab(tmp_path, load_merges=True)
    assert sv.merges == ["a\u0120b c", "d e"]
    assert sv.add == {"bos": True}  # the post-processor wins over tokenizer_config
    assert sv.ids == {"bos": 5, "eos": 6}
    tj["post_processor"] = {"type": "ByteLevel"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    assert load_special_vocab(tmp_path).add == {"bos": False, "eos": False}


def test_chat_template_list(tmp_path):
    templates = [{"name": "default", "template": "D"}, {"name": "tool use", "template": "T"}]
    kv = chat_template_kv(templates)
    assert kv == [("tokenizer.chat_template.tool_use", "T"), ("tokenizer.chat_templates", ["tool_use"]),
                  ("tokenizer.chat_template", "D")]  # fmt: skip


def test_bad_inputs(tmp_path):
    with pytest.raises(BadInput, match="no tokenizer"):
        gguf_tokenizer_kv(tmp_path, {"architectures": ["LlamaForCausalLM"]})
    with pytest.raises(UnsupportedArchitecture):
        gguf_tokenizer_kv(tmp_path, {"architectures": ["BertModel"], "model_type": "bert"})
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CorruptFile):
        gguf_tokenizer_kv(tmp_path, {"architectures": ["LlamaForCausalLM"]})
    base = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b"], "tokenizer.ggml.merges": []}
    with pytest.raises(UnsupportedType, match="pre-tokenizer"):
        hf_tokenizer_files({**base, "tokenizer.ggml.pre": "no-such-pre"})
    with pytest.raises(UnsupportedType, match="'bert'"):
        hf_tokenizer_files({**base, "tokenizer.ggml.model": "bert"})
    with pytest.raises(CorruptFile, match="twice"):
        hf_tokenizer_files({**base, "tokenizer.ggml.tokens": ["a", "a"]})
    with pytest.raises(CorruptFile, match="no tokenizer.ggml.tokens"):
        hf_tokenizer_files({"tokenizer.ggml.model": "gpt2"})
    with pytest.raises(CorruptFile, match="shorter"):
        hf_tokenizer_files({**base, "tokenizer.ggml.token_type": [1]})


def test_named_chat_templates_round_trip(tmp_path):
    md = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.tokens": ["a", "b", "ab"],
          "tokenizer.ggml.merges": ["a b"], "tokenizer.chat_template": "D", "tokenizer.chat_templates": ["tool_use"],
          "tokenizer.chat_template.tool_use": "T"}  # fmt: skip
    files = hf_tokenizer_files(md)
    config = json.loads(files["tokenizer_config.json"])
    assert config["chat_template"] == [
        {"name": "default", "template": "D"},
        {"name": "tool_use", "template": "T"},
    ]
    _write_files(tmp_path, files)
    sv = load_special_vocab(tmp_path)
    assert chat_template_kv(sv.chat_template) == [
        ("tokenizer.chat_template.tool_use", "T"), ("tokenizer.chat_templates", ["tool_use"]),
        ("tokenizer.chat_template", "D")]  # fmt: skip
    assert _auto(tmp_path)("ab", add_special_tokens=False)["input_ids"] == [2]


def test_spm_tokenizer_json_only_follows_llama_hf_vocab(tmp_path, spm_model):
    """Without tokenizer.model the reference exports an SPM-style tokenizer.json with every score at -1000; going
    back, llmq warns that llama.cpp's position-based tie breaking cannot be reproduced."""
    src, config = _spm_dir(tmp_path / "src", spm_model)
    first = _metadata(gguf_tokenizer_kv(src, config))
    files = hf_tokenizer_files(first)
    del files["tokenizer.model"]
    only_json = _write_files(tmp_path / "json_only", files)
    (only_json / "config.json").write_text(json.dumps(config))
    md = _metadata(gguf_tokenizer_kv(only_json, config))
    assert (
        md["tokenizer.ggml.model"] == "llama"
        and md["tokenizer.ggml.tokens"] == first["tokenizer.ggml.tokens"]
    )
    assert set(md["tokenizer.ggml.scores"]) == {-1000.0}
    types = md["tokenizer.ggml.token_type"]
    assert types.count(6) == 256 and types[1:3] == [3, 3] and types.count(3) == 2  # bytes; <s>, </s>
    with pytest.warns(UserWarning, match="share a score"):
        hf_tokenizer_files(md)
