"""A sentencepiece `tokenizer.model` rebuilt from a GGUF "llama" vocabulary.

Why: convert_hf_to_gguf.py only keeps the real piece scores when it finds tokenizer.model; from a tokenizer.json
alone it writes every score as -1000, and llama.cpp's SPM tokenizer, which merges by score, then tokenizes
differently. Shipping the model file beside tokenizer.json keeps GGUF -> HF -> GGUF faithful.

The file is a ModelProto (sentencepiece_model.proto) encoded here by hand: three messages and a dozen scalar fields
do not justify a protobuf dependency.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

UNKNOWN, BYTE = 2, 6
_BPE = 2  # TrainerSpec.ModelType: what llama.cpp's score-ordered merging amounts to


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int32 values are sign-extended to ten bytes, as protobuf does
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field_varint(num: int, value: int) -> bytes:
    return _varint(num << 3) + _varint(value)


def _field_bytes(num: int, data: bytes) -> bytes:
    return _varint(num << 3 | 2) + _varint(len(data)) + data


def _field_float(num: int, value: float) -> bytes:
    return _varint(num << 3 | 5) + struct.pack("<f", value)


def spm_model_proto(
    tokens: Sequence[str], scores: Sequence[float], types: Sequence[int], *, unk_id: int | None,
    bos_id: int | None, eos_id: int | None, pad_id: int | None, add_space_prefix: bool,
) -> bytes | None:  # fmt: skip
    """The serialized ModelProto, or None when sentencepiece could not load it (it requires an unknown piece)."""
    types = list(types)
    if UNKNOWN not in types:
        if unk_id is None and "<unk>" in tokens:
            unk_id = list(tokens).index("<unk>")
        if unk_id is None:
            return None
        types[unk_id] = UNKNOWN  # read back as unknown, then re-typed from tokenizer_config like the original
    pieces = b"".join(
        _field_bytes(1, _field_bytes(1, t.encode("utf-8", "surrogateescape")) + _field_float(2, s)
                     + _field_varint(3, ty))
        for t, s, ty in zip(tokens, scores, types)
    )  # fmt: skip
    has_bytes = sum(1 for ty in types if ty == BYTE) == 256
    trainer = (
        _field_varint(3, _BPE)
        + _field_varint(4, len(tokens))
        + _field_varint(35, int(has_bytes))
        + _field_varint(40, types.index(UNKNOWN))
        + _field_varint(41, -1 if bos_id is None else bos_id)
        + _field_varint(42, -1 if eos_id is None else eos_id)
        + _field_varint(43, -1 if pad_id is None else pad_id)
    )
    normalizer = (
        _field_bytes(1, b"identity")
        + _field_varint(3, int(add_space_prefix))
        + _field_varint(4, 0)  # llama.cpp never collapses whitespace
        + _field_varint(5, 1)
    )
    return pieces + _field_bytes(2, trainer) + _field_bytes(3, normalizer)
