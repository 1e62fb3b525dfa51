"""GPTQ / AWQ: llmq and llm-compressor side by side on the same model, calibration tokens and settings.

    python benchmarks/gptq_awq.py --model DIR [--nsamples 128 --seqlen 512 --group-size 64 --methods gptq,awq]

Each quantization runs in its own subprocess (wall time and peak RSS of that process); llm-compressor runs in
the virtualenv given by --peer-python (default .venv-llmc/bin/python, created with --system-site-packages so it
shares this torch). Both receive the very same calibration token ids (pydocs corpus). Every result is evaluated
by the same code: perplexity on wikitext-2 test (llama-perplexity style: 512-token chunks, second half scored)
and mean KL divergence to the unquantized model. RTN at the same bits/group is the baseline of the quality bar.
Writes benchmarks/results/gptq_awq.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import peak_rss_bytes  # noqa: E402


def shared_dir() -> Path:
    env = os.environ.get("LLMQ_SHARED")
    for cand in ([Path(env)] if env else []) + [ROOT.parent / "shared", Path("/work/shared")]:
        if (cand / "data").is_dir():
            return cand
    raise SystemExit("shared data dir not found (set LLMQ_SHARED)")


def calibration_ids(model: Path, nsamples: int, seqlen: int, seed: int):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(model))
    from llmq.calib.samples import calibration_samples

    return calibration_samples(tok, "pydocs", nsamples, seqlen, seed)


def truncate_model(src: Path, dst: Path, layers: int) -> Path:
    """The first ``layers`` decoder blocks of ``src`` (+ embeddings, final norm): a smaller but real model for
    machines where the full run does not fit the time at hand. Both tools get the same truncated model."""
    from safetensors.torch import load_file, save_file

    if (dst / "config.json").is_file():
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] = layers
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            if ".layers." in k and int(k.split(".layers.")[1].split(".")[0]) >= layers:
                continue
            tensors[k] = v
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "chat_template.jinja"):
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def peak_rss_mib() -> float:
    return peak_rss_bytes() / 2**20


# ---------------------------------------------------------------------------------------------- workers


def worker_llmq(method: str, model: str, calib: str, out: str, group_size: int, bits: int, opts: str) -> dict:
    import torch

    from llmq.quant.blockwise.awq import AWQBlockMethod, AWQConfig
    from llmq.quant.blockwise.gptq import GPTQBlockMethod, GPTQConfig
    from llmq.quant.blockwise.pipeline import quantize_blockwise

    ids = torch.load(calib)
    common = dict(
        format="fake-quant", bits=bits, group_size=group_size, nsamples=ids.shape[0], seqlen=ids.shape[1]
    )
    if method == "gptq":
        # llmq's defaults (true-sequential, token clip, damp 0.2, float target), with llm-compressor's static
        # act-order and symmetric grid; its algorithm is
        # `--llmq-opts '{"damp_percent": 0.01, "true_sequential": false, "token_clip": 0, "float_target": 0}'`
        cfg = GPTQConfig(**(common | dict(sym=True, act_order=True, static_groups=True) | json.loads(opts)))
        meth = GPTQBlockMethod(cfg)
    else:
        cfg = AWQConfig(**(common | dict(sym=False) | json.loads(opts)))
        meth = AWQBlockMethod(cfg)
    t = time.perf_counter()
    res = quantize_blockwise(Path(model), Path(out), cfg, meth, method, samples=ids, force=True)
    return {"seconds": time.perf_counter() - t, "peak_rss_mib": peak_rss_mib(), "notes": res.notes}


def worker_peer(method: str, model: str, calib: str, out: str, group_size: int, bits: int, opts: str) -> dict:
    import torch
    import transformers
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.pipelines.cache import IntermediatesCache

    # llm-compressor 0.14's AWQ pins cached activations unconditionally, which fails without an accelerator;
    # pinning only speeds up host-to-device copies, so on CPU it is skipped
    IntermediatesCache.pin_memory = lambda self, *a, **k: None
    ids = torch.load(calib)
    sym = method == "gptq"
    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(
            num_bits=bits, type="int", symmetric=sym, strategy="group", group_size=group_size
        ),
    )
    if method == "gptq":
        from llmcompressor.modifiers.gptq import GPTQModifier

        recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"], dampening_frac=0.01)
    else:
        from llmcompressor.modifiers.awq import AWQModifier

        recipe = AWQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"], duo_scaling=True)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    t = time.perf_counter()
    model_obj = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    tok = (
        transformers.AutoTokenizer.from_pretrained(model) if Path(model, "tokenizer.json").exists() else None
    )
    oneshot(
        model=model_obj,
        dataset=data,
        recipe=recipe,
        num_calibration_samples=ids.shape[0],
        max_seq_length=ids.shape[1],
        pipeline="sequential",
        processor=tok,
    )
    seconds = time.perf_counter() - t
    # the weights as the quantized model computes with them (compressed-tensors' fake_quantize), saved as a plain
    # checkpoint for the common evaluator
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from safetensors.torch import save_file

    sd = {}
    for name, mod in model_obj.named_modules():
        scheme = getattr(mod, "quantization_scheme", None)
        if isinstance(mod, torch.nn.Linear) and scheme is not None and scheme.weights is not None:
            zp = getattr(mod, "weight_zero_point", None)
            w = fake_quantize(
                mod.weight.detach().float(),
                mod.weight_scale.detach(),
                zp.detach() if zp is not None else None,
                scheme.weights,
            )
            sd[name + ".weight"] = w
    for k, v in model_obj.state_dict().items():
        tied = k == "lm_head.weight" and model_obj.config.tie_word_embeddings
        if k.endswith(".weight") and k not in sd and "weight_" not in k and not tied:
            sd.setdefault(k, v.detach().float())
    os.makedirs(out, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in sd.items()}, out + "/model.safetensors", metadata={"format": "pt"}
    )
    # its own packed output counts in its time, as llmq's writing does
    t = time.perf_counter()
    model_obj.save_pretrained(out + ".compressed", save_compressed=True)
    seconds += time.perf_counter() - t
    rss = peak_rss_mib()
    cfg = json.loads(Path(model, "config.json").read_text())
    Path(out, "config.json").write_text(json.dumps(cfg))
    return {"seconds": seconds, "peak_rss_mib": rss, "notes": []}


def rtn_baseline(model: Path, out: Path, bits: int, group_size: int, sym: bool) -> None:
    import torch
    import transformers

    from llmq.quant.grid import fake_quantize

    m = transformers.AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    with torch.no_grad():
        for name, mod in m.named_modules():
            if isinstance(mod, torch.nn.Linear) and ".layers." in name:
                mod.weight.copy_(fake_quantize(mod.weight, bits, group_size, sym))
    m.save_pretrained(str(out))


# ---------------------------------------------------------------------------------------------- evaluation


def evaluate(model: Path, candidates: dict[str, Path], chunks: int, ctx: int = 512) -> dict[str, dict]:
    import math

    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(model))
    text = (shared_dir() / "data" / "wikitext-2-raw" / "wiki.test.raw").read_text()
    ids = torch.tensor(tok.encode(text, add_special_tokens=False))
    n = min(chunks, ids.numel() // ctx)
    load = lambda p: transformers.AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32).eval()  # noqa: E731
    base = load(model)
    models = {k: load(p) for k, p in candidates.items()}
    stats = {k: {"nll": 0.0, "kld": 0.0, "top1": 0, "n": 0} for k in ["base", *models]}
    torch.set_grad_enabled(False)
    for c in range(n):
        x = ids[c * ctx : (c + 1) * ctx].unsqueeze(0)
        tgt = x[0, ctx // 2 + 1 :]
        lb = base(x).logits[0, ctx // 2 : -1].log_softmax(-1)
        outs = {"base": lb} | {k: m(x).logits[0, ctx // 2 : -1].log_softmax(-1) for k, m in models.items()}
        for k, lp in outs.items():
            s = stats[k]
            s["nll"] -= float(lp.gather(1, tgt.unsqueeze(1)).sum())
            s["kld"] += float((lb.exp() * (lb - lp)).sum())
            s["top1"] += int((lp.argmax(-1) == lb.argmax(-1)).sum())
            s["n"] += tgt.numel()
    return {k: {"ppl": math.exp(s["nll"] / s["n"]), "kld": s["kld"] / s["n"], "same_top1": s["top1"] / s["n"],
                "tokens": s["n"]} for k, s in stats.items()}  # fmt: skip


# ---------------------------------------------------------------------------------------------- driver


def run_worker(python: str, kind: str, method: str, args, calib: Path, out: Path) -> dict:
    cmd = [python, str(Path(__file__).resolve()), "--worker", kind, "--method-one", method, "--model",
           str(args.model), "--calib", str(calib), "--out-dir", str(out), "--group-size", str(args.group_size),
           "--bits", str(args.bits), "--llmq-opts", args.llmq_opts if kind == "llmq" else "{}"]  # fmt: skip
    t, load0 = time.perf_counter(), os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds (user + system, all threads) depend much less on other jobs than wall time does
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    load = [round(load0, 2), round(os.getloadavg()[0], 2)]
    if proc.returncode:
        sys.stderr.write(proc.stderr[-4000:])
        return {
            "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed",
            "wall_s": wall,
        }
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res |= {"process_wall_s": wall, "process_cpu_s": cpu, "load_avg_start_end": load}
    return res


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [f"# GPTQ / AWQ: llmq vs llm-compressor {report['peer_version']}", "",
             f"Model {s['model_name']}, {s['bits']}-bit, group {s['group_size']}, calibration pydocs "
             f"{s['nsamples']}×{s['seqlen']} tokens (identical ids for both tools), eval wikitext-2 test "
             f"{report['eval']['base']['tokens']} scored tokens (512-token chunks, second half). "
             f"Machine: {s['machine']}.", "",
             "| run | quantize wall s | process CPU s | load avg (start, end) | peak RSS MiB | PPL | ΔPPL | mean KLD "
             "| same top-1 |", "|---|---:|---:|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    base = report["eval"]["base"]["ppl"]
    for k, e in report["eval"].items():
        run = report["runs"].get(k, {})
        wall = f"{run['seconds']:.1f}" if "seconds" in run else ""
        rss = f"{run['peak_rss_mib']:.0f}" if "peak_rss_mib" in run else ""
        cpu = f"{run['process_cpu_s']:.0f}" if "process_cpu_s" in run else ""
        load = ", ".join(f"{x:g}" for x in run.get("load_avg_start_end", []))
        lines.append(f"| {k} | {wall} | {cpu} | {load} | {rss} | {e['ppl']:.4f} | {e['ppl'] - base:+.4f} | "
                     f"{e['kld']:.5f} | {100 * e['same_top1']:.2f}% |")  # fmt: skip
    lines += ["", "## Bars", ""] + [f"- {line}" for line in report["bars"]]
    return "\n".join(lines) + "\n"


def bars(report: dict) -> list[str]:
    ev, runs, out = report["eval"], report["runs"], []
    base = ev["base"]["ppl"]
    for method, rtn in (("gptq", "rtn-sym"), ("awq", "rtn-asym")):
        mine, peer = f"llmq-{method}", f"llmc-{method}"
        if mine not in ev:
            continue
        d_mine, d_rtn = ev[mine]["ppl"] - base, ev[rtn]["ppl"] - base
        out.append(f"{method}: ΔPPL {d_mine:.4f} vs {rtn} {d_rtn:.4f} → {100 * (1 - d_mine / d_rtn):.1f}% smaller "
                   f"(bar: ≥ 30%) {'PASS' if d_mine <= 0.7 * d_rtn else 'FAIL'}")  # fmt: skip
        other = "rtn-asym" if rtn == "rtn-sym" else "rtn-sym"
        if other in ev:
            d_other = ev[other]["ppl"] - base
            out.append(f"{method} (for reference, against the other RTN grid): ΔPPL {d_mine:.4f} vs {other} "
                       f"{d_other:.4f} → {100 * (1 - d_mine / d_other):.1f}% smaller")  # fmt: skip
        if "error" in runs.get(peer, {}):
            out.append(f"{method}: peer run did not complete: {runs[peer]['error']}")
            stopped, mine_run = runs[peer], runs.get(mine, {})
            if "stopped_wall_s" in stopped and "seconds" in mine_run:
                cpu = (f", CPU {mine_run['process_cpu_s'] / stopped['stopped_cpu_s']:.2f}×"
                       if "process_cpu_s" in mine_run and "stopped_cpu_s" in stopped else "")  # fmt: skip
                out.append(f"{method}: time ratio at most wall {mine_run['seconds'] / stopped['stopped_wall_s']:.2f}×"
                           f"{cpu} (the peer had not finished when stopped; quality not compared)")  # fmt: skip
        if peer in ev and "seconds" in runs.get(peer, {}):
            ratio = runs[mine]["seconds"] / runs[peer]["seconds"]
            if "process_cpu_s" in runs[mine] and "process_cpu_s" in runs[peer]:
                out.append(
                    f"{method}: CPU time ratio {runs[mine]['process_cpu_s'] / runs[peer]['process_cpu_s']:.2f}×"
                )
            better = ev[mine]["ppl"] <= ev[peer]["ppl"] and ev[mine]["kld"] <= ev[peer]["kld"]
            out.append(f"{method}: PPL {ev[mine]['ppl']:.4f} vs peer {ev[peer]['ppl']:.4f}, KLD {ev[mine]['kld']:.5f}"
                       f" vs {ev[peer]['kld']:.5f} ({'equal or better' if better else 'WORSE'}); wall time ratio "
                       f"{ratio:.2f}× (target ≤ 0.5×) {'PASS' if ratio <= 0.5 else 'FAIL'}")  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--model", type=Path, required=True, help="HF safetensors directory (llmq convert output)"
    )
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--methods", default="gptq,awq")
    ap.add_argument(
        "--llmq-opts", default="{}", help="JSON overrides of llmq's config, e.g. '{\"mse\": 2.4}'"
    )
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--rerun", action="store_true", help="redo runs whose results are already in --work")
    ap.add_argument("--layers", type=int, default=0, help="keep only the first N decoder blocks (0: all)")
    ap.add_argument("--peer-python", default=str(ROOT / ".venv-llmc" / "bin" / "python"))
    ap.add_argument("--eval-chunks", type=int, default=80)
    ap.add_argument("--work", type=Path, default=ROOT / "bench-out" / "gptq_awq")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    # worker mode (internal)
    ap.add_argument("--worker", choices=["llmq", "peer"])
    ap.add_argument("--method-one")
    ap.add_argument("--calib")
    ap.add_argument("--out-dir")
    args = ap.parse_args()
    if args.worker:
        fn = worker_llmq if args.worker == "llmq" else worker_peer
        print(
            json.dumps(
                fn(
                    args.method_one,
                    str(args.model),
                    args.calib,
                    args.out_dir,
                    args.group_size,
                    args.bits,
                    args.llmq_opts,
                )
            )
        )
        return

    import platform

    import torch

    args.work.mkdir(parents=True, exist_ok=True)
    full_name = args.model.name
    if args.layers:
        args.model = truncate_model(args.model, args.work / f"model-{args.layers}-layers", args.layers)
    calib = args.work / "calib.pt"
    if not calib.is_file():
        torch.save(calibration_ids(args.model, args.nsamples, args.seqlen, 0), calib)
    runs: dict[str, dict] = {}
    candidates: dict[str, Path] = {}
    for sym in (True, False):
        key = "rtn-sym" if sym else "rtn-asym"
        if not (args.work / key).is_dir():
            rtn_baseline(args.model, args.work / key, args.bits, args.group_size, sym)
        candidates[key] = args.work / key
    peer_version = "(not run)"
    todo = [(f"{tool}-{m}", m) for m in args.methods.split(",") for tool in ("llmq", "llmc")
            if tool == "llmq" or not args.no_peer]  # fmt: skip
    for key, method in todo:
        saved = args.work / f"{key}.json"
        if saved.is_file() and not args.rerun:
            continue
        python, kind = (sys.executable, "llmq") if key.startswith("llmq") else (args.peer_python, "peer")
        res = run_worker(python, kind, method, args, calib, args.work / key)
        print(key, res, flush=True)
        saved.write_text(json.dumps(res))
    # results of earlier invocations with the same --work directory are kept and reported too
    for saved in sorted(args.work.glob("*.json")):
        res = json.loads(saved.read_text())
        runs[saved.stem] = res
        if "error" not in res:
            candidates[saved.stem] = args.work / saved.stem
    if any(k.startswith("llmc") for k in runs) and Path(args.peer_python).exists():
        peer_version = subprocess.run([args.peer_python, "-c", "import llmcompressor;print(llmcompressor.__version__)"],
                                      capture_output=True, text=True).stdout.strip().splitlines()[-1]  # fmt: skip
    report = {
        "settings": {"model_name": full_name + (f" truncated to its first {args.layers} blocks" if args.layers
                                                 else ""), "bits": args.bits, "group_size": args.group_size,
                     "nsamples": args.nsamples, "seqlen": args.seqlen, "machine":
                     f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, CPU only"},
        "peer_version": peer_version, "runs": runs,
        "eval": evaluate(args.model, candidates, args.eval_chunks),
    }  # fmt: skip
    report["bars"] = bars(report)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "gptq_awq.json").write_text(json.dumps(report, indent=2))
    (args.results / "gptq_awq.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
