"""The gguf quantizer plugin end to end: files byte-identical to llama_model_quantize, imatrix, requantizing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf_helpers import gguf_tensors, llama_quantize, tiny_llama_tensors, write_llama_gguf

from llmq.errors import BadInput, OutputExists, UnsupportedType
from llmq.quant.base import quantizers
from llmq.quant.gguf.imatrix import Imatrix, save_imatrix
from llmq.quant.gguf.quantizer import GGUFQuantConfig, GGUFQuantizer

pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    t = tiny_llama_tensors(hidden=256, n_layers=4, ff=512, vocab=256, n_head=4, n_kv=1, seed=3)
    return write_llama_gguf(tmp_path_factory.mktemp("q") / "tiny-f32.gguf", t, n_head=4, n_kv=1), t


def test_registered() -> None:
    # (the registry's get() imports every built-in method module; checking the decorator's entry needs only ours)
    assert quantizers._items["gguf"] is GGUFQuantizer


@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q3_K_M", "Q2_K", "Q5_1", "Q6_K", "F16"])
def test_file_identical_to_llama_cpp(tmp_path, tiny_src, ftype: str) -> None:
    src, _ = tiny_src
    ref, out = tmp_path / "ref.gguf", tmp_path / "ours.gguf"
    llama_quantize(src, ref, ftype)
    res = GGUFQuantizer().run(src, out, GGUFQuantConfig(type=ftype))
    assert out.read_bytes() == ref.read_bytes()
    assert res.output_bytes == out.stat().st_size
    assert {t.name: t.dtype for t in res.tensors} == {n: v[0] for n, v in gguf_tensors(out).items()}


def test_plan_matches_output(tmp_path, tiny_src) -> None:
    src, _ = tiny_src
    cfg = GGUFQuantConfig(type="Q4_K_S", tensor_type=("ffn_down=q8_0",))
    planned = GGUFQuantizer().plan(src, cfg)
    res = GGUFQuantizer().run(src, tmp_path / "o.gguf", cfg)
    assert [(t.name, t.dtype, t.nbytes) for t in planned] == [
        (t.name, t.dtype, t.nbytes) for t in res.tensors
    ]
    assert all(t.dtype == "Q8_0" for t in planned if "ffn_down" in t.name)


def test_imatrix_matches_llama_cpp(tmp_path, tiny_src) -> None:
    src, tensors = tiny_src
    rng = np.random.default_rng(7)
    im = Imatrix(datasets=["unit"], chunk_count=3, chunk_size=128)
    for name, a in tensors.items():
        if a.ndim == 2 and name != "token_embd.weight":
            im.sums[name] = (rng.random((1, a.shape[1])) * 50).astype(np.float32)
            im.counts[name] = np.array([384])
    imfile = save_imatrix(im, tmp_path / "imatrix.gguf")
    for ftype in ("Q4_K_M", "Q2_K_S", "Q4_0"):
        ref, out = tmp_path / f"ref-{ftype}.gguf", tmp_path / f"ours-{ftype}.gguf"
        llama_quantize(src, ref, ftype, imatrix=im.weights())
        GGUFQuantizer().run(src, out, GGUFQuantConfig(type=ftype, imatrix=str(imfile)))
        ours, theirs = gguf_tensors(out), gguf_tensors(ref)
        for name, (t, raw, _) in theirs.items():
            assert ours[name][0] == t, name
            assert (ours[name][1] == raw).all(), (ftype, name)
    import gguf

    meta = gguf.GGUFReader(str(out)).fields
    assert meta["quantize.imatrix.entries_count"].contents() == len(im.sums)
    assert meta["quantize.imatrix.dataset"].contents() == "unit"


def test_q2_k_s_needs_imatrix(tmp_path, tiny_src) -> None:
    with pytest.raises(BadInput, match="importance matrix"):
        GGUFQuantizer().run(tiny_src[0], tmp_path / "o.gguf", GGUFQuantConfig(type="Q2_K_S"))
    assert not (tmp_path / "o.gguf").exists()


def test_requantize_needs_flag(tmp_path, tiny_src) -> None:
    q8 = tmp_path / "q8.gguf"
    GGUFQuantizer().run(tiny_src[0], q8, GGUFQuantConfig(type="Q8_0"))
    with pytest.raises(BadInput, match="allow-requantize"):
        GGUFQuantizer().run(q8, tmp_path / "q4.gguf", GGUFQuantConfig(type="Q4_0"))
    with pytest.warns(UserWarning, match="requantizing"):
        res = GGUFQuantizer().run(
            q8, tmp_path / "q4.gguf", GGUFQuantConfig(type="Q4_0", allow_requantize=True)
        )
    assert res.notes and (tmp_path / "q4.gguf").exists()


def test_config_validation_and_outputs(tmp_path, tiny_src) -> None:
    with pytest.raises(BadInput):
        GGUFQuantConfig(type="Q7_K")
    with pytest.raises(UnsupportedType):
        GGUFQuantConfig(type="IQ2_XXS")
    with pytest.raises(BadInput):
        GGUFQuantConfig(tensor_type=("nopattern",))
    with pytest.raises(BadInput):
        GGUFQuantConfig.from_options("gguf", {"group_size": 128})
    with pytest.raises(BadInput):
        GGUFQuantConfig(threads=0)
    cfg = GGUFQuantConfig.from_options("gguf", {"type": "q4_k_m", "tensor_type": ("attn_v=Q8_0",)})
    assert GGUFQuantConfig.from_dict(cfg.to_dict()) == cfg and cfg.type == "Q4_K_M"
    out = tmp_path / "o.gguf"
    out.write_bytes(b"x")
    with pytest.raises(OutputExists):
        GGUFQuantizer().run(tiny_src[0], out, GGUFQuantConfig(type="Q8_0"))
    with pytest.raises(BadInput):
        GGUFQuantizer().run(tiny_src[0], tiny_src[0], GGUFQuantConfig(type="Q8_0"), force=True)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    with pytest.raises(BadInput):
        GGUFQuantizer().run(bad, tmp_path / "o2.gguf", GGUFQuantConfig(type="Q8_0"))


def test_hf_directory_source_and_calibration(tmp_path) -> None:
    pytest.importorskip("transformers")
    from helpers import make_tiny_model

    from llmq.conversion import convert
    from llmq.quant.gguf.imatrix import load_imatrix

    hf = make_tiny_model(tmp_path / "hf", hidden=256, layers=2, vocab=512, ffn=512)
    ours, ref, f32 = tmp_path / "ours.gguf", tmp_path / "ref.gguf", tmp_path / "f32.gguf"
    GGUFQuantizer().run(hf, ours, GGUFQuantConfig(type="Q4_K_M"))
    convert(hf, f32, outtype="f32")
    llama_quantize(f32, ref, "Q4_K_M")
    assert ours.read_bytes() == ref.read_bytes()
    assert not list(tmp_path.glob(".*llmq-tmp-*"))  # no temporary left

    cfg = GGUFQuantConfig(type="Q3_K_M", calibration="pydocs", nsamples=2, seqlen=64,
                          save_imatrix=str(tmp_path / "im.gguf"))  # fmt: skip
    res = GGUFQuantizer().run(hf, tmp_path / "q3.gguf", cfg)
    im = load_imatrix(tmp_path / "im.gguf")
    assert len(im) == 14 and im.chunk_count == 2 and im.datasets == ["pydocs"]
    assert int(im.counts["blk.0.attn_q.weight"][0]) == 128
    assert res.output_bytes == (tmp_path / "q3.gguf").stat().st_size


def test_plan_from_hf_directory(tmp_path) -> None:
    pytest.importorskip("transformers")
    from helpers import make_tiny_model

    hf = make_tiny_model(tmp_path / "hf", hidden=256, layers=2, vocab=512, ffn=512, shards=1)
    plan = GGUFQuantizer().plan(hf, GGUFQuantConfig(type="Q4_K_M"))
    res = GGUFQuantizer().run(hf, tmp_path / "o.gguf", GGUFQuantConfig(type="Q4_K_M"))
    assert [(t.name, t.dtype, t.nbytes) for t in plan] == [(t.name, t.dtype, t.nbytes) for t in res.tensors]


def test_threads_and_read_ahead_do_not_change_bytes(tmp_path, tiny_src, monkeypatch) -> None:
    from llmq.quant.gguf import blocks as gguf_blocks
    from llmq.quant.gguf import workers as gguf_workers

    src, _ = tiny_src
    outs = []
    for threads, read_ahead, chunk in ((1, 64 << 20, 1 << 18), (3, 64 << 20, 1 << 18), (2, 1, 1024)):
        monkeypatch.setattr(gguf_workers, "READ_AHEAD_BYTES", read_ahead)
        monkeypatch.setattr(gguf_blocks, "_CHUNK_VALUES", chunk)  # many small work items per tensor
        out = tmp_path / f"o{threads}.gguf"
        GGUFQuantizer().run(src, out, GGUFQuantConfig(type="Q4_K_M", threads=threads))
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] == outs[2]


def _no_children() -> bool:
    import os

    try:
        os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        return True
    return False


@pytest.mark.parametrize("processes", [True, False])
def test_process_and_thread_runners_write_the_same_bytes(tmp_path, tiny_src, monkeypatch, processes) -> None:
    from llmq.quant.gguf import workers as gguf_workers

    if processes and not gguf_workers.fork_available():
        pytest.skip("encoder processes are forked on Linux only")
    monkeypatch.setattr(gguf_workers, "fork_available", lambda: processes)
    monkeypatch.setattr(gguf_workers, "JOB_VALUES", 4096)  # many jobs per tensor, several tensors in flight
    src, _ = tiny_src
    GGUFQuantizer().run(src, tmp_path / "one.gguf", GGUFQuantConfig(type="Q2_K", threads=1))
    GGUFQuantizer().run(src, tmp_path / "two.gguf", GGUFQuantConfig(type="Q2_K", threads=2))
    assert (tmp_path / "one.gguf").read_bytes() == (tmp_path / "two.gguf").read_bytes()
    assert _no_children()


@pytest.mark.parametrize("threads", [1, 2])
def test_error_in_an_encoder_is_one_clean_error(tmp_path, tiny_src, monkeypatch, threads) -> None:
    from llmq.errors import CorruptFile
    from llmq.quant.gguf import workers as gguf_workers

    real = gguf_workers.encode

    def fails(weights, job, **kw):
        if job.src.name == "blk.2.ffn_up.weight":
            raise CorruptFile(f"{job.src.name}: bad rows")
        return real(weights, job, **kw)

    monkeypatch.setattr(gguf_workers, "encode", fails)  # inherited by the forked workers
    src, _ = tiny_src
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(CorruptFile, match="blk.2.ffn_up.weight: bad rows"):
        GGUFQuantizer().run(src, out_dir / "o.gguf", GGUFQuantConfig(type="Q4_K_M", threads=threads))
    assert list(out_dir.iterdir()) == []  # no output, no temp file
    assert _no_children()


def test_dead_worker_and_interrupt_leave_nothing(tmp_path, tiny_src, monkeypatch) -> None:
    import os

    from llmq.quant.gguf import workers as gguf_workers

    if not gguf_workers.fork_available():
        pytest.skip("encoder processes are forked on Linux only")
    src, _ = tiny_src
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    real = gguf_workers.encode

    def dies(weights, job, **kw):
        if job.src.name == "blk.1.attn_v.weight":
            os._exit(3)
        return real(weights, job, **kw)

    monkeypatch.setattr(gguf_workers, "encode", dies)
    with pytest.raises(gguf_workers.WorkerError, match="encoder process died"):
        GGUFQuantizer().run(src, out_dir / "o.gguf", GGUFQuantConfig(type="Q4_K_M", threads=2))
    assert list(out_dir.iterdir()) == [] and _no_children()

    monkeypatch.setattr(gguf_workers, "encode", real)

    def interrupt(stage, done, total):
        if done:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        GGUFQuantizer().run(
            src, out_dir / "o.gguf", GGUFQuantConfig(type="Q4_K_M", threads=2), progress=interrupt
        )
    assert list(out_dir.iterdir()) == [] and _no_children()


def test_arena_ring_never_overlaps_live_results() -> None:
    from llmq.quant.gguf.workers import _Ring

    rng = np.random.default_rng(0)
    ring = _Ring(100)
    for _ in range(5000):
        if ring.live and (rng.random() < 0.45 or ring.alloc(40) is None):
            ring.pop()
            continue
        n = int(rng.integers(1, 41))
        off = ring.alloc(n)
        if off is None:
            continue
        assert 0 <= off and off + n <= 100
        assert all(off + n <= o or o + m <= off for o, m in ring.live)
        ring.push(off, n)
    assert _Ring(10).alloc(11) is None


def test_unpicklable_worker_error_still_surfaces(tmp_path, tiny_src, monkeypatch) -> None:
    from llmq.quant.gguf import workers as gguf_workers

    if not gguf_workers.fork_available():
        pytest.skip("encoder processes are forked on Linux only")

    class LocalError(Exception):  # a local class: pickle cannot find it by name
        pass

    def fails(weights, job, **kw):
        raise LocalError("cannot encode")

    monkeypatch.setattr(gguf_workers, "encode", fails)
    src, _ = tiny_src
    with pytest.raises(RuntimeError, match="LocalError: cannot encode"):
        GGUFQuantizer().run(src, tmp_path / "o.gguf", GGUFQuantConfig(type="Q8_0", threads=2))
    assert list(tmp_path.iterdir()) == [] and _no_children()


def test_calibration_names_are_llmq_calib_sources(tmp_path, tiny_src, monkeypatch) -> None:
    from llmq.quant.gguf import imatrix as imx

    def no_work(*a, **k):
        raise AssertionError("no model may be run for a bad calibration name")

    monkeypatch.setattr(imx, "imatrix_from_calibration", no_work)
    with pytest.raises(BadInput, match="neither a known dataset"):
        GGUFQuantConfig(type="Q4_K_M", calibration="no-such-set")
    for spec in ("pydocs", "wikitext2", "c4", "pile-val", "ptb", "pydoc"):
        GGUFQuantConfig(type="Q4_K_M", calibration=spec)  # every llmq.calib source is accepted
    text, name = imx.calibration_text("pydocs")
    assert name == "pydocs" and len(text) > 100_000
