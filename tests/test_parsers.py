"""The header parsers against hostile input: hard caps (llmq.io.limits), fixed-size reads, one-line errors naming
the file and the field, and the symlink policy (llmq.io.paths)."""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import pytest

from llmq.errors import CorruptFile, UnsafePath
from llmq.io import limits, open_checkpoint, paths
from llmq.io.gguf import GGUFReader, parse_gguf_header
from llmq.io.readat import file_read_at
from llmq.io.safetensors import SafetensorsReader, parse_safetensors_header
from tests.fuzz import formats as F


class Reads:
    """A read_at over bytes that records every (offset, size) asked for."""

    def __init__(self, blob: bytes):
        self.blob, self.calls = blob, []

    def __call__(self, off: int, n: int) -> bytes:
        self.calls.append((off, n))
        return self.blob[off : off + n]


def _gguf_error(blob: bytes, tmp_path: Path) -> str:
    p = tmp_path / "x.gguf"
    p.write_bytes(blob)
    with pytest.raises(CorruptFile) as e:
        GGUFReader(p)
    msg = str(e.value)
    assert msg.startswith("x.gguf: ") and "\n" not in msg
    return msg


def test_base_gguf_parses_and_reads_are_fixed_size(tmp_path):
    blob = F.base_gguf(vocab=200_000)  # a ~3.5 MB header: several chunks
    p = tmp_path / "b.gguf"
    p.write_bytes(blob)
    r = GGUFReader(p)
    assert r.metadata["llama.block_count"] == 1 and len(r.metadata["tokenizer.ggml.tokens"]) == 200_000
    assert r.metadata["tokenizer.ggml.tokens"][199_999] == "tok199999"
    assert r.kv_types["tokenizer.ggml.tokens"][1].name == "STRING"
    reads = Reads(blob)
    h = parse_gguf_header(reads, "b.gguf", len(blob), decode_strings="raw")
    assert (
        list(h.tensors) == r.names() and h.kv["tokenizer.ggml.tokens"] == r.metadata["tokenizer.ggml.tokens"]
    )
    # no growing windows: every read is one chunk, consecutive, never re-reading a byte
    assert all(n == limits.GGUF_READ_CHUNK for _, n in reads.calls)
    assert [o for o, _ in reads.calls] == [i * limits.GGUF_READ_CHUNK for i in range(len(reads.calls))]


@pytest.mark.parametrize(
    ("blob", "match"),
    [
        (F.gguf([], [], n_tensors=limits.MAX_TENSORS + 1), "more than the limits"),
        (F.gguf([], [], n_kv=limits.MAX_METADATA_KEYS + 1), "more than the limits"),
        (
            F.gguf([F.kv("a", F.ARR, struct.pack("<IQ", F.U8, limits.GGUF_MAX_ARRAY_ELEMENTS + 1))], []),
            "a: array of",
        ),
        (F.gguf([F.s("k" * (limits.MAX_NAME_BYTES + 1))], []), "key #0: string of 4097 bytes exceeds"),
        (F.gguf([F.kv("a", F.STR, struct.pack("<Q", limits.MAX_STRING_BYTES + 1))], []), "a: string of"),
        # the 2M empty arrays: refused at the nested-array cap, before any of them is read
        (F.gguf([F.kv("a", F.ARR, struct.pack("<IQ", F.ARR, 2_000_000))], []), "a: array of"),
        (
            F.gguf(
                [F.kv("a", F.ARR, struct.pack("<IQ", F.ARR, 70_000) + struct.pack("<IQ", F.U8, 0) * 70_000)],
                [],
            ),
            "arrays of arrays",
        ),
        (
            F.gguf(
                [F.kv(f"a{i}", F.ARR, struct.pack("<IQ", F.U8, 1 << 20) + bytes(1 << 20)) for i in range(3)],
                [],
            ),
            "array elements in",
        ),
        (
            F.gguf([F.kv("general.alignment", F.BOOL, F.scalar(F.BOOL, True))], []),
            "general.alignment True \\(BOOL\\)",
        ),
        (F.gguf([F.kv("general.alignment", F.U32, F.scalar(F.U32, 48))], []), "general.alignment 48"),
        (F.gguf([], [F.tensor_record("t", [4], 0, 0)], n_tensors=1) + b"\0" * 8, "past the end"),
        (F.gguf([], [F.tensor_record("t" * 5000, [4], 0, 0)]), "name of 5000 bytes exceeds"),
        (F.gguf([F.kv("a", F.U8, b"\1"), F.kv("a", F.U8, b"\1")], []), "duplicate key a"),
        (b"GGUF" + struct.pack("<IQQ", 4, 0, 0) + b"\0" * 8, "unsupported GGUF version 4"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_gguf_caps(tmp_path, blob, match):
    assert re.search(match, _gguf_error(blob, tmp_path))


def test_gguf_header_bytes_cap(tmp_path):
    """Three maximal strings make a header over the cap: refused once the cap is reached, not after reading."""
    n = limits.MAX_STRING_BYTES
    p = tmp_path / "big.gguf"
    with open(p, "wb") as f:
        f.write(b"GGUF" + struct.pack("<IQQ", 3, 0, 3))
        for i in range(3):
            f.write(F.s(f"k{i}") + struct.pack("<IQ", F.STR, n))
            f.seek(n, os.SEEK_CUR)
        f.truncate()
    with pytest.raises(CorruptFile, match="GGUF header larger than the 64 MiB limit"):
        GGUFReader(p, decode_strings=False)


def _st_error(blob: bytes, tmp_path: Path) -> str:
    p = tmp_path / "x.safetensors"
    p.write_bytes(blob)
    with pytest.raises(CorruptFile) as e:
        SafetensorsReader(p)
    msg = str(e.value)
    assert msg.startswith("x.safetensors: ") and "\n" not in msg
    return msg


def _entry(**kw):
    e = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    e.update(kw)
    return {"t": e}


@pytest.mark.parametrize(
    ("header", "match"),
    [
        (b'{"t":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nests deeper than 8"),  # was RecursionError
        (b'{"__metadata__":{"a":' + b'{"b":' * 10 + b'"c"' + b"}" * 10 + b"}}", "nests deeper"),
        (
            b'{"t":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,8]}}',
            "tensor t has an invalid shape",
        ),  # was ValueError (4,300 digits)
        (_entry(data_offsets=[0, int("1" * 30)]), "tensor t has invalid data_offsets"),
        (_entry(dtype=["F32"]), "tensor t has unknown dtype \\['F32'\\]"),  # was TypeError
        (_entry(dtype={"a": 1}), "tensor t has unknown dtype"),
        (_entry(shape=[True, 2]), "tensor t has an invalid shape"),
        (_entry(shape=[2.0]), "tensor t has an invalid shape"),
        (_entry(shape="2"), "tensor t has an invalid shape"),
        (_entry(data_offsets=[0, 8, 9]), "tensor t has invalid data_offsets"),
        (_entry(data_offsets=None), "tensor t has invalid data_offsets"),
        ({"t": [1, 2]}, "entry for t is not an object"),
        ({"__metadata__": {"a": 1}}, "__metadata__ must map strings to strings"),
        ([1, 2], "not a JSON object"),
        (b'{"a":}', "not valid JSON"),
        (json.dumps(_entry()).encode("utf-16"), "not UTF-8"),
        ({"x" * (limits.MAX_NAME_BYTES + 1): _entry()["t"]}, "exceeds the 4096-byte limit"),
        (
            b"{" + b",".join(b'"t%d":{}' % i for i in range(limits.MAX_TENSORS + 2)) + b"}",
            f"more than {limits.MAX_TENSORS} tensors",
        ),
        (
            b'{"t":[' + b"0," * (limits.SAFETENSORS_MAX_JSON_VALUES + 1) + b"0]}",
            f"more than {limits.SAFETENSORS_MAX_JSON_VALUES} values",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_safetensors_malformed(tmp_path, header, match):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    assert re.search(match, _st_error(F.st(raw, b"\0" * 8), tmp_path))


def test_safetensors_read_at_and_strings_with_brackets(tmp_path):
    """Brackets and escaped quotes inside strings do not count as nesting."""
    hdr = F.base_st_header()
    hdr["__metadata__"]["note"] = '[[[[[[[[[[{{{{{{{{{ \\" \\\\" \\\\\\"'
    hdr['we"ird[[[[[[[[[name\\'] = {"dtype": "U8", "shape": [0], "data_offsets": [176, 176]}
    blob = F.st(hdr, bytes(range(176)))
    reads = Reads(blob)
    infos, meta = parse_safetensors_header(reads, "m", len(blob))
    assert meta["note"].startswith("[[[") and len(infos) == 5
    assert reads.calls[0] == (0, 8) and len(reads.calls) == 2  # the length, then the header in one read


def test_safetensors_matches_reference(tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    p = tmp_path / "ref.safetensors"
    save_file(
        {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(0, np.int8)}, str(p), {"k": "v"}
    )
    infos, meta = parse_safetensors_header(file_read_at(p), p.name, p.stat().st_size)
    assert meta == {"k": "v"} and infos["a"].shape == (2, 3) and infos["b"].nbytes == 0


# ----------------------------------------------------------------------------------------------- symlinks


def _model_dir(root: Path) -> Path:
    d = root / "model"
    d.mkdir()
    (d / "model.safetensors").write_bytes(F.base_st())
    (d / "config.json").write_text("{}")
    return d


def test_symlink_out_of_model_dir_refused(tmp_path):
    d = _model_dir(tmp_path)
    secret = tmp_path / "secret.json"
    secret.write_text("{}")
    (d / "tokenizer.json").symlink_to(secret)
    with pytest.raises(UnsafePath, match="tokenizer.json is a symlink resolving outside the model directory"):
        open_checkpoint(d)
    paths.allow_symlinks(True)
    try:
        open_checkpoint(d)
    finally:
        paths.allow_symlinks(False)


def test_symlinked_shard_directory_refused(tmp_path):
    d = _model_dir(tmp_path)
    (d / "model.safetensors").unlink()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "model-00001-of-00001.safetensors").write_bytes(F.base_st())
    sub = d / "sub"
    sub.mkdir()
    (sub / "shards").symlink_to(outside)  # one level down: not an entry of the model directory itself
    names = [k for k in F.base_st_header() if k != "__metadata__"]
    index = {"weight_map": {n: "sub/shards/model-00001-of-00001.safetensors" for n in names}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UnsafePath, match="shards/model-00001-of-00001.safetensors is a symlink"):
        open_checkpoint(d)


def test_hf_cache_layout_allowed_and_inside_links_allowed(tmp_path):
    repo = tmp_path / "hub" / "models--o--n"
    blobs, snap = repo / "blobs", repo / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    (blobs / "1234").write_bytes(F.base_st())
    (snap / "model.safetensors").symlink_to(blobs / "1234")
    (snap / "alias.json").symlink_to(snap / "model.safetensors")  # inside: fine
    assert len(list(open_checkpoint(snap).infos())) == 4
    (snap / "x.json").symlink_to(tmp_path)  # out of the cache repo: refused
    with pytest.raises(UnsafePath):
        open_checkpoint(snap)


def test_gguf_split_part_symlink_refused(tmp_path):
    from llmq.io.gguf import split_paths

    d = tmp_path / "m"
    d.mkdir()
    (d / "m-00001-of-00002.gguf").write_bytes(b"")
    (tmp_path / "evil.gguf").write_bytes(b"")
    (d / "m-00002-of-00002.gguf").symlink_to(tmp_path / "evil.gguf")
    with pytest.raises(UnsafePath, match="m-00002-of-00002.gguf is a symlink"):
        split_paths(d / "m-00001-of-00002.gguf")


def test_cli_allow_symlinks(tmp_path, capsys):
    from llmq.cli.app import main

    d = _model_dir(tmp_path)
    (tmp_path / "other.json").write_text("{}")
    (d / "generation_config.json").symlink_to(tmp_path / "other.json")
    with pytest.raises(SystemExit) as e:
        main(["inspect", str(d), "--json"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--allow-symlinks" in err[0]
    with pytest.raises(SystemExit) as e:
        main(["--allow-symlinks", "inspect", str(d), "--json"])
    assert e.value.code in (0, None)
    assert json.loads(capsys.readouterr().out)["summary"]["n_tensors"] == 4
    with pytest.raises(SystemExit):  # the flag holds for one invocation only
        main(["inspect", str(d), "--json"])
