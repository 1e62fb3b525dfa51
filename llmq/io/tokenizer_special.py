"""Special tokens, add-bos/eos flags, merges and chat template of an HF tokenizer directory, the way llama.cpp's
converter reads them (gguf-py's SpecialVocab as vendored in llama-cpp-python 0.3.36), so that llmq writes the same
`tokenizer.ggml.*` values. Only json is parsed here: no transformers, no torch.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmq.errors import CorruptFile

DEFAULT_TYPES: tuple[str, ...] = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")

# Special-token kinds the GGUF writer has a key for; the reference skips the others (cls, prefix, ...).
ID_KEYS: dict[str, str] = {
    "bos": "tokenizer.ggml.bos_token_id",
    "eos": "tokenizer.ggml.eos_token_id",
    "unk": "tokenizer.ggml.unknown_token_id",
    "sep": "tokenizer.ggml.seperator_token_id",  # sic: that is the key's spelling in GGUF
    "pad": "tokenizer.ggml.padding_token_id",
    "mask": "tokenizer.ggml.mask_token_id",
    "eot": "tokenizer.ggml.eot_token_id",
    "eom": "tokenizer.ggml.eom_token_id",
}
ADD_KEYS: dict[str, str] = {
    "bos": "tokenizer.ggml.add_bos_token",
    "eos": "tokenizer.ggml.add_eos_token",
    "sep": "tokenizer.ggml.add_sep_token",
}


def read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFile(f"cannot read {path}: {e}") from e


@dataclass
class SpecialVocab:
    """What the reference's SpecialVocab collects from tokenizer.json, tokenizer_config.json and config.json."""

    merges: list[str] = field(default_factory=list)
    ids: dict[str, int] = field(default_factory=dict)
    add: dict[str, bool] = field(default_factory=dict)
    chat_template: str | list[dict[str, str]] | None = None
    lowercase: bool | None = None
    strip_accents: bool | None = None

    def set_id(self, kind: str, tid: Any, n_vocab: int | None) -> None:
        # First one wins: tokenizer_config.json is read before config.json.
        if not isinstance(tid, int) or isinstance(tid, bool):
            return
        if tid < 0:
            raise CorruptFile(f"invalid id {tid} for the {kind} token")
        if (n_vocab is None or tid < n_vocab) and kind not in self.ids:
            self.ids[kind] = tid


def load_special_vocab(
    hf_dir: Path,
    *,
    load_merges: bool = False,
    types: Iterable[str] = DEFAULT_TYPES,
    n_vocab: int | None = None,
) -> SpecialVocab:
    sv = SpecialVocab()
    types = tuple(types)
    tok_json = read_json(hf_dir / "tokenizer.json") if (hf_dir / "tokenizer.json").is_file() else None
    tc_path = hf_dir / "tokenizer_config.json"
    tc = read_json(tc_path) if tc_path.is_file() else None
    added: list[dict] = []
    if tok_json is not None:
        if load_merges:
            sv.merges = _merges_from_tokenizer_json(tok_json)
        if isinstance(tok_json.get("normalizer"), dict):
            _parse_normalizer(sv, tok_json["normalizer"])
        added = tok_json.get("added_tokens") or []
        types = _parse_post_processor(sv, tok_json, tc, types)
    if tc is not None:
        sv.chat_template = _chat_template(hf_dir, tc)
        for kind in types:
            flag = tc.get(f"add_{kind}_token")
            if isinstance(flag, bool):
                sv.add.setdefault(kind, flag)  # the post-processor, when it said something, wins
            entry = tc.get(f"{kind}_token")
            content = entry.get("content") if isinstance(entry, dict) else entry
            if isinstance(content, str):
                tid = next((a.get("id") for a in added if a.get("content") == content), None)
                sv.set_id(kind, tid, n_vocab)
    if (hf_dir / "config.json").is_file():
        config = read_json(hf_dir / "config.json")
        for kind in types:
            tid = config.get(f"{kind}_token_id")
            if tid is None and isinstance(config.get("text_config"), dict):
                tid = config["text_config"].get(f"{kind}_token_id")
            sv.set_id(kind, tid, n_vocab)
    if load_merges and not sv.merges and (hf_dir / "merges.txt").is_file():
        sv.merges = _merges_txt(hf_dir / "merges.txt")
    return sv


def _merges_from_tokenizer_json(tok_json: dict) -> list[str]:
    merges = (tok_json.get("model") or {}).get("merges")
    if not isinstance(merges, list) or not merges:
        return []
    if isinstance(merges[0], str):
        return list(merges)
    if isinstance(merges[0], list) and len(merges[0]) == 2:
        # transformers >= 4.45 writes pairs so that parts may hold spaces; GGUF keeps "a b" strings, with a space
        # inside a part moved to U+0120 (what GPT-2's byte map gives a space).
        return [" ".join(p.replace(" ", "\u0120") for p in pair) for pair in merges]
    raise CorruptFile("tokenizer.json: unknown format of model.merges")


def _merges_txt(path: Path) -> list[str]:
    merges = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            line = line.strip()
            if not line or (i == 0 and line.startswith("#")):
                continue
            parts = line.split(None, 3)
            if len(parts) == 2:
                merges.append(f"{parts[0]} {parts[1]}")
    return merges


def _parse_normalizer(sv: SpecialVocab, norm: dict) -> None:
    kind = norm.get("type")
    if kind == "Lowercase":
        sv.lowercase = True
    elif kind == "StripAccents":
        sv.strip_accents = True
    elif kind == "BertNormalizer":
        if "lowercase" in norm:
            sv.lowercase = norm["lowercase"]
        if "strip_accents" in norm:
            sv.strip_accents = norm["strip_accents"]
    elif kind == "Sequence":
        for sub in norm.get("normalizers") or []:
            if isinstance(sub, dict):
                _parse_normalizer(sv, sub)


def _special_token_id(item: dict) -> Any:
    return (item.get("SpecialToken") or {}).get("id")


def _parse_post_processor(sv: SpecialVocab, tok_json: dict, tc: dict | None, types: tuple[str, ...]) -> tuple:
    """Read add-bos/eos/sep from the post-processor; may rewrite tc's bos/eos names and extend `types` with eot/eom
    exactly like the reference, which then looks those names up in the added tokens."""
    pp = tok_json.get("post_processor")
    if not isinstance(pp, dict):
        return types
    tcd = tc or {}
    bos, cls, eos, sep = (tcd.get(k) for k in ("bos_token", "cls_token", "eos_token", "sep_token"))
    if not bos and cls and tc:
        tc["bos_token"] = bos = cls
    if not eos and sep and tc:
        tc["eos_token"] = eos = sep
    for proc in pp.get("processors") or [pp]:
        kind = proc.get("type")
        if kind == "ByteLevel":
            sv.add.setdefault("bos", False)
            sv.add.setdefault("eos", False)
        elif kind == "RobertaProcessing":
            sv.add.update(bos=True, eos=True, sep=True)
            if not cls and tc:
                tc["cls_token"] = cls = (proc.get("cls") or [bos])[0]
            if not sep and tc:
                tc["sep_token"] = sep = (proc.get("sep") or [eos])[0]
        elif kind == "TemplateProcessing":
            single = proc.get("single") or []
            first = last = None
            if len(single) > 1:
                if first := _special_token_id(single[0]):
                    if not tc:
                        bos = first
                    elif first not in (bos, cls):
                        if not bos:
                            tc["bos_token"] = bos = first
                        if not cls:
                            tc["cls_token"] = cls = first
                    sv.add["bos"] = first in (bos, cls)
                if last := _special_token_id(single[-1]):
                    if not tc:
                        eos = last
                    elif last != eos:
                        # The old eos becomes eot (or eom) and the template's last token the eos.
                        if "eot" not in types:
                            types = types + ("eot",)
                            tc["eot_token"] = eos
                        elif "eom" not in types:
                            types = types + ("eom",)
                            tc["eom_token"] = eos
                        tc["eos_token"] = eos = last
                    sv.add["eos"] = last == eos
            _parse_pair_template(sv, proc.get("pair") or [], first, last, sep, eos, tc)
    return types


def _parse_pair_template(sv, pair: list, first, last, sep, eos, tc: dict | None) -> None:
    if not pair:
        return
    start = 1 if first and _special_token_id(pair[0]) == first else 0
    stop = -1 if last and _special_token_id(pair[-1]) == last else None
    pair = pair[start:stop]
    if not pair:
        return
    a = (pair[0].get("Sequence") or {}).get("id")
    b = (pair[-1].get("Sequence") or {}).get("id")
    middle = pair[1:-1]
    if a != "A" or b != "B" or not middle:
        return
    add_sep = False
    entry = _special_token_id(middle[0])
    if entry and entry in (sep, eos) and not last:
        add_sep = True
    if len(middle) == 2 and (entry2 := _special_token_id(middle[1])) and entry2 in (sep, eos):
        add_sep = True
    sv.add["sep"] = add_sep
    if add_sep and not sep and tc:
        tc["sep_token"] = eos


def _chat_template(hf_dir: Path, tc: dict) -> str | list[dict[str, str]] | None:
    alt: str | list[dict[str, str]] | None = None
    jinja = hf_dir / "chat_template.jinja"
    if jinja.is_file():
        alt = jinja.read_text(encoding="utf-8")
        extra = sorted((hf_dir / "additional_chat_templates").glob("*.jinja"))
        if extra:
            alt = [{"name": "default", "template": alt}]
            alt += [{"name": p.stem, "template": p.read_text(encoding="utf-8")} for p in extra]
    elif (hf_dir / "chat_template.json").is_file():
        alt = read_json(hf_dir / "chat_template.json").get("chat_template")
    template = tc.get("chat_template", alt)
    return template if template is None or isinstance(template, (str, list)) else None


def chat_template_kv(template: str | list[dict[str, str]]) -> list[tuple[str, Any]]:
    """The keys GGUFWriter.add_chat_template writes: named templates go to tokenizer.chat_template.<name>."""
    if isinstance(template, str):
        return [("tokenizer.chat_template", template)]
    out: list[tuple[str, Any]] = []
    names: list[str] = []
    default = None
    for choice in template:
        name = "".join(c if c.isascii() and c.isalnum() else "_" for c in choice.get("name", ""))
        text = choice.get("template")
        if not name or text is None:
            continue
        if name == "default":
            default = text
        elif name not in names:
            names.append(name)
            out.append((f"tokenizer.chat_template.{name}", text))
    if names:
        out.append(("tokenizer.chat_templates", names))
    if default is not None:
        out.append(("tokenizer.chat_template", default))
    return out
