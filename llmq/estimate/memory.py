"""Memory estimate of a model under an engine: weights, KV cache, overhead — every term named with its formula.

``estimate_memory(EstimateConfig(...))`` reads only headers (see sources.py), never imports torch, and returns an
``Estimate`` whose ``to_dict()`` is what ``llmq estimate memory --json`` prints.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from llmq.errors import BadInput
from llmq.estimate import engines, kv, quants, solvers
from llmq.estimate.arch import ModelArch, from_config, from_gguf
from llmq.estimate.engines import Term
from llmq.estimate.hardware import GPU, custom_gpu, get_gpu
from llmq.estimate.sources import ModelSource, load_model
from llmq.estimate.synth import synthesize
from llmq.io.base import TensorInfo

DEFAULT_CONTEXT = 4096
VERSION = 1

# --fit ladders, best quality first
FIT_LADDER = {
    "llama.cpp": ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K"),
    "vllm": ("bf16", "fp8", "gptq8", "awq4", "gptq4", "gptq3"),
    "transformers": ("bf16", "int8", "nf4-dq"),
}


@dataclass(frozen=True)
class EstimateConfig:
    model: str
    quants: tuple[str, ...] = ()
    context: int | None = None
    batch: int = 1
    kv_cache_dtype: str | None = None  # K and V (llama.cpp: type_k/type_v)
    v_cache_dtype: str | None = None  # V only, when it differs from K (llama.cpp)
    gpu: str | None = None
    vram_gib: float | None = None
    num_gpus: int = 1
    tp: int | None = None
    engine: str | None = None
    fit: bool = False
    flash_attn: bool = True
    swa_full: bool = (
        True  # llama.cpp: full-size SWA cache (library default; llama-server uses --swa-full off)
    )
    n_ubatch: int = 512
    gpu_memory_utilization: float = engines.VLLM_GPU_MEMORY_UTILIZATION
    version: int = VERSION

    def __post_init__(self) -> None:
        if self.engine is not None and self.engine not in engines.ENGINES:
            raise BadInput(f"--engine must be one of {', '.join(engines.ENGINES)}")
        if self.gpu and self.vram_gib:
            raise BadInput("--gpu and --vram are exclusive")
        if self.batch < 1 or self.num_gpus < 1 or (self.tp is not None and self.tp < 1):
            raise BadInput("--batch, --num-gpus and --tp must be at least 1")
        if self.tp is not None and self.tp > self.num_gpus:
            raise BadInput(f"--tp {self.tp} needs at least {self.tp} GPUs (--num-gpus {self.num_gpus})")
        if self.context is not None and self.context < 1:
            raise BadInput("--context must be at least 1")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise BadInput("gpu_memory_utilization must be in (0, 1]")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EstimateConfig:
        d = dict(d)
        d["quants"] = tuple(d.get("quants", ()))
        return cls(**d)


@dataclass
class QuantEstimate:
    quant: str
    weights_bytes: int  # whole model
    quantized_bytes: int
    kept_bytes: int
    n_quantized: int
    n_kept: int
    params_total: int
    params_active: int
    active_weight_bytes: int
    terms: list[Term]  # one GPU
    total_bytes: int  # one GPU
    kv_per_token_bytes: int
    fits: bool | None = None
    max_context: int | None = None
    max_sequences: int | None = None
    gpus_needed: int | None = None
    perf: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["terms"] = [t.to_dict() for t in self.terms]
        return d


@dataclass
class Estimate:
    model: str
    source_kind: str
    arch: dict[str, Any]
    engine: str
    context: int
    batch: int
    tp: int
    num_gpus: int
    gpu: dict[str, Any] | None
    budget_bytes: int | None
    results: list[QuantEstimate]
    best_fit: str | None
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "results"}
        d["results"] = [r.to_dict() for r in self.results]
        d["units"] = {"bytes": "B", "GiB": "2^30 B", "GB": "10^9 B"}
        return d


def _arch_summary(a: ModelArch) -> dict[str, Any]:
    d = asdict(a)
    d["layer_kinds"] = {k: a.layer_kinds.count(k) for k in sorted(set(a.layer_kinds))}
    d["n_kv_heads"] = sorted(set(a.n_kv_heads))
    return d


def _validate(src: ModelSource) -> None:
    """Plan-time checks of the config/metadata of a family llmq knows (llmq.archs); others pass as they are."""
    from llmq.archs import FAMILIES, lookup
    from llmq.archs.validate import check_gguf_kv, check_hf_config

    if src.gguf_metadata is not None:
        family = FAMILIES.get(str(src.gguf_metadata.get("general.architecture", "")))
        if family is not None:
            check_gguf_kv(family, src.gguf_metadata, str(src.spec))
    elif isinstance(src.config, Mapping) and not isinstance(src.config.get("text_config"), Mapping):
        family = lookup(src.config)
        if family is not None:
            check_hf_config(src.config, family, f"{src.spec}/config.json")


def model_arch(src: ModelSource) -> tuple[ModelArch, list[TensorInfo], list[str]]:
    notes: list[str] = []
    _validate(src)
    if src.gguf_metadata is not None:
        a = from_gguf(src.gguf_metadata, src.tensors)
        a.dtype = "F16"
        return a, src.tensors, notes
    if src.config is None:
        raise BadInput(f"{src.spec}: no config.json beside the weights; estimating needs the architecture")
    a = from_config(src.config)
    tensors = src.tensors
    if not tensors:
        tensors, exact = synthesize(a, src.config)
        notes.append(
            "weights derived from config.json (no headers read)" + ("" if exact else "; approximate")
        )
    return a, tensors, notes


def _default_engine(src: ModelSource, specs: list[quants.QuantSpec]) -> str:
    if src.gguf_metadata is not None or any(s.is_gguf for s in specs):
        return "llama.cpp"
    return "transformers"


def _weights(spec: quants.QuantSpec, a: ModelArch, tensors: list[TensorInfo], src: ModelSource,
             engine: str) -> tuple[list[quants.TensorBytes], int, str]:  # fmt: skip
    """Per-tensor bytes and the model's bytes in memory under the engine, with the formula."""
    if spec.family == "stored" and engine == "transformers" and src.gguf_metadata is None:
        spec = quants.parse_quant({"F32": "fp32", "F16": "fp16", "BF16": "bf16"}[a.dtype])  # dtype="auto"
    kvh = max(a.n_kv_heads) if a.n_kv_heads else 0
    per = quants.target_bytes(spec, tensors, a.dtype, arch=a.arch, n_layers=a.n_layers,
                              is_gguf_names=src.gguf_metadata is not None, n_expert=a.n_experts,
                              n_gqa=a.n_heads // kvh if kvh else 1)  # fmt: skip
    if engine == "llama.cpp":
        if spec.family == "stored" and src.gguf_data_span is not None:
            return (
                per,
                src.gguf_data_span,
                "GGUF data span: last tensor end − first tensor start (mmap'd buffer)",
            )
        sizes = [t.nbytes for t in per]
        return per, engines.gguf_file_span(sizes), "Σ tensors, each padded to 32 B (GGUF alignment), mmap'd"
    return per, sum(t.nbytes for t in per), "Σ per-tensor bytes of the format"


def _params(tensors: list[TensorInfo], per: list[quants.TensorBytes], a: ModelArch) -> tuple[int, int, int]:
    total = sum(t.numel for t in tensors)
    expert = sum(t.numel for t in tensors if quants.is_expert(t.name))
    expert_bytes = sum(p.nbytes for p in per if quants.is_expert(p.name))
    share = a.n_experts_active / a.n_experts if a.n_experts else 0.0
    active = total - expert + int(expert * share)
    active_bytes = sum(p.nbytes for p in per) - expert_bytes + int(expert_bytes * share)
    return total, active, active_bytes


class _Planner:
    """Everything fixed for one quantization; evaluates the per-GPU terms at any (context, batch, tp)."""

    def __init__(self, est_cfg: EstimateConfig, a: ModelArch, engine: str, weights_bytes: int, wformula: str,
                 cache_k: str, cache_v: str, gpu: GPU | None):  # fmt: skip
        self.cfg, self.a, self.engine, self.gpu = est_cfg, a, engine, gpu
        self.weights_bytes, self.wformula = weights_bytes, wformula
        self.cache_k, self.cache_v = cache_k, cache_v

    def layout(self, context: int, batch: int, tp: int) -> kv.KVLayout:
        return kv.kv_layout(self.a, self.engine, context, batch, self.cache_k, self.cache_v, tp=tp,
                            n_ubatch=self.cfg.n_ubatch, flash_attn=self.cfg.flash_attn,
                            swa_full=self.cfg.swa_full)  # fmt: skip

    def terms(self, context: int, batch: int, n_gpus: int) -> list[Term]:
        split = n_gpus  # vLLM: tensor parallel; llama.cpp and transformers (device_map): layers split
        tp = split if self.engine == "vllm" else 1
        w = self.weights_bytes // split
        wf = self.wformula + (f" / {split} GPUs" if split > 1 else "")
        out = [Term("weights", w, wf, "exact" if split == 1 else "approximation")]
        if self.engine == "vllm":
            out.append(engines.vllm_vocab_padding(self.a, 2 if self.a.dtype != "F32" else 4, tp))
        lay = self.layout(context, batch, tp)
        kv_split = 1 if self.engine == "vllm" else split  # a layer split also splits the layers' cache
        out.append(Term("KV cache K", lay.k_bytes // kv_split, lay.formula, "exact"))
        if lay.v_bytes or not self.a.is_mla:
            out.append(Term("KV cache V", lay.v_bytes // kv_split, lay.formula, "exact"))
        if lay.state_bytes:
            out.append(Term("recurrent state", lay.state_bytes // kv_split,
                            f"recurrent layers × batch {batch} × (conv {self.a.conv_state} + ssm "
                            f"{self.a.ssm_state}) elements", "exact"))  # fmt: skip
        out += engines.overhead_terms(self.engine, self.a, self.gpu, context, batch, tp, lay.total,
                                      n_ubatch=self.cfg.n_ubatch, flash_attn=self.cfg.flash_attn)  # fmt: skip
        return out

    def total(self, context: int, batch: int, n_gpus: int) -> int:
        return sum(t.nbytes for t in self.terms(context, batch, n_gpus))


def budget_of(gpu: GPU | None, engine: str, util: float) -> int | None:
    if gpu is None:
        return None
    usable = gpu.usable_bytes
    return int(usable * util) if engine == "vllm" else usable


def estimate_memory(cfg: EstimateConfig, source: ModelSource | None = None) -> Estimate:
    src = source or load_model(cfg.model)
    a, tensors, notes = model_arch(src)
    specs = [quants.parse_quant(q) for q in cfg.quants] or [quants.parse_quant("stored")]
    engine = cfg.engine or _default_engine(src, specs)
    if cfg.fit and not cfg.quants:
        specs = [quants.parse_quant(q) for q in FIT_LADDER[engine]]
    gpu = get_gpu(cfg.gpu) if cfg.gpu else custom_gpu(cfg.vram_gib) if cfg.vram_gib else None
    context = cfg.context or min(a.max_context or DEFAULT_CONTEXT, DEFAULT_CONTEXT)
    n_gpus = cfg.tp or cfg.num_gpus
    cache_k = kv.resolve_cache_type(engine, cfg.kv_cache_dtype, a.dtype)
    cache_v = kv.resolve_cache_type(engine, cfg.v_cache_dtype or cfg.kv_cache_dtype, a.dtype)
    budget = budget_of(gpu, engine, cfg.gpu_memory_utilization)
    if engine == "vllm" and budget is not None:
        notes.append(f"budget = gpu_memory_utilization {cfg.gpu_memory_utilization} × usable memory")
    results = [_one(spec, cfg, a, tensors, src, engine, gpu, context, n_gpus, cache_k, cache_v, budget)
               for spec in specs]  # fmt: skip
    best = next((r.quant for r in results if r.fits), None) if budget is not None else None
    return Estimate(cfg.model, src.kind, _arch_summary(a), engine, context, cfg.batch, n_gpus if engine == "vllm"
                    else 1, n_gpus, asdict(gpu) if gpu else None, budget, results, best, notes)  # fmt: skip


def _one(spec: quants.QuantSpec, cfg: EstimateConfig, a: ModelArch, tensors: list[TensorInfo], src: ModelSource,
         engine: str, gpu: GPU | None, context: int, n_gpus: int, cache_k: str, cache_v: str,
         budget: int | None) -> QuantEstimate:  # fmt: skip
    per, wbytes, wformula = _weights(spec, a, tensors, src, engine)
    plan = _Planner(cfg, a, engine, wbytes, wformula, cache_k, cache_v, gpu)
    terms = plan.terms(context, cfg.batch, n_gpus)
    total = sum(t.nbytes for t in terms)
    params, active, active_bytes = _params(tensors, per, a)
    q = [p for p in per if p.quantized]
    r = QuantEstimate(
        quant=spec.name, weights_bytes=wbytes, quantized_bytes=sum(p.nbytes for p in q),
        kept_bytes=sum(p.nbytes for p in per if not p.quantized), n_quantized=len(q), n_kept=len(per) - len(q),
        params_total=params, params_active=active, active_weight_bytes=active_bytes, terms=terms,
        total_bytes=total, kv_per_token_bytes=plan.layout(context, 1, n_gpus if engine == "vllm" else 1).per_token_bytes,
    )  # fmt: skip
    if budget is not None:
        fn: Callable[[int, int, int], int] = plan.total
        r.fits = total <= budget
        r.max_context = solvers.max_context(fn, budget, cfg.batch, n_gpus)
        r.max_sequences = solvers.max_sequences(fn, budget, context, n_gpus)
        r.gpus_needed = solvers.gpus_needed(fn, budget, context, cfg.batch, engine, a.n_heads)
    if gpu is not None and gpu.bandwidth:
        r.perf = solvers.performance(a, gpu, active, active_bytes, plan.layout(context, 1, 1).total, context,
                                     cfg.batch, n_gpus)  # fmt: skip
    return r
