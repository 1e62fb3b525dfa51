"""The block-by-block pipeline shared by GPTQ and AWQ.

1. Read the header(s) and validate everything on metadata first: architecture, which Linears are quantized,
   group-size divisibility (a clear ShapeError naming the layers, or with ``skip_indivisible`` a note).
2. Tokenize the calibration samples and capture the inputs of the first decoder block (embeddings, plus the
   rotary position embeddings / mask the real model passes) - the model is a ``meta`` skeleton built from its
   config, so nothing but the embedding is loaded.
3. For each block: materialize its weights from the safetensors shards, let the method quantize it (it leaves
   the dequantized weights in the module), run the *quantized* block to get the next block's inputs, save the
   block's tensors to a resume directory, and drop the weights. Only one block is ever resident.
4. Stream the result into the output format (through an atomic temporary), then remove the resume directory.

``resume=True`` finds the resume directory of an interrupted run with the same source and config and continues
after the last finished block.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from llmq.archs import Family as Arch
from llmq.archs import for_model_type
from llmq.archs.validate import check_hf_model
from llmq.errors import BadInput, CalibrationError, CorruptFile, ShapeError, UnsupportedArchitecture
from llmq.quant.base import Progress, QuantizeResult, no_progress
from llmq.quant.blockwise.output import plan_packed, write_output
from llmq.quant.blockwise.resume import ResumeDir, block_tensors, fingerprint
from llmq.quant.select import is_selected

if TYPE_CHECKING:
    import torch

    from llmq.formats.base import QuantizedLinear
    from llmq.quant.blockwise.config import BlockwiseConfig

BATCH_TOKENS = 4096  # calibration tokens per forward batch: large enough for efficient matmuls, small in RAM


class StopForward(Exception):
    """Raised by a hook once every input a stage needs has been seen, to skip the rest of the block."""


@dataclass
class BlockContext:
    index: int
    prefix: str  # e.g. "model.layers.3."
    layer: Any  # the torch module of the block, weights materialized (float32)
    arch: Arch
    targets: list[str]  # names (relative to the block) of the Linears to quantize
    inputs: list[torch.Tensor]  # hidden states entering the block, one tensor per batch
    kwargs: list[dict[str, Any]]  # the keyword arguments the model passes to the block, per batch
    notes: list[str]
    outputs: list[torch.Tensor] | None = None  # set by a method whose last forward already gave the outputs
    float_inputs: list[torch.Tensor] | None = None  # hidden states of the unquantized model (float targets)
    float_outputs: list[torch.Tensor] | None = None

    def module(self, name: str):
        return self.layer.get_submodule(name)

    def forward(self, batch: int):
        out = self.layer(self.inputs[batch], **self.kwargs[batch])
        return out[0] if isinstance(out, tuple) else out

    def run_until(self, hooks: dict[str, Any], stop_after: set[str] | None = None) -> None:
        """Forward every batch with forward-pre hooks ``{module name: fn(batch index, input)}``.

        With ``stop_after``, the forward of a batch stops once those modules have seen their input.
        """
        handles, seen = [], set()

        batch = 0

        def make(name, fn):
            def hook(_mod, args):
                fn(batch, args[0])
                seen.add(name)
                if stop_after is not None and stop_after <= seen:
                    raise StopForward

            return hook

        for name, fn in hooks.items():
            handles.append(self.module(name).register_forward_pre_hook(make(name, fn)))
        try:
            for batch in range(len(self.inputs)):
                seen.clear()
                try:
                    self.forward(batch)
                except StopForward:
                    pass
        finally:
            for h in handles:
                h.remove()

    def run_staged(self, points: list[str], on_input, on_point) -> list[torch.Tensor]:
        """One forward of every batch, all batches paused together at each of ``points`` (module names, in the
        order the forward reaches them): ``on_input(k, b, x)`` gets batch b's input of module ``points[k]``,
        then, once every batch is there, ``on_point(k)`` runs (it may change the weights from module k on,
        e.g. quantize them) and the batches go on. Returns the block outputs.

        This is true-sequential GPTQ in a single forward per block (instead of one partial forward per group
        plus a last one for the outputs). The batches are paused mid-forward on threads of their own, only one
        of which ever runs at a time; the price is that every batch's live activations are held at once.
        """
        import torch

        index = {name: k for k, name in enumerate(points)}
        released = [False] * len(points)
        local = threading.local()

        def make(name):
            k = index[name]

            def hook(_mod, args):
                if released[k]:
                    return
                on_input(k, local.fiber.index, args[0])
                local.fiber.pause(k)

            return hook

        def run(b: int):
            def body():
                with torch.no_grad():
                    return self.forward(b).detach()

            return body

        fibers = [_Fiber(run(b), local, b) for b in range(len(self.inputs))]
        handles = [self.module(name).register_forward_pre_hook(make(name)) for name in points]
        try:
            for k, name in enumerate(points):
                for f in fibers:
                    f.resume()
                    if f.done or f.paused_at != k:
                        where = "the end of the block" if f.done else repr(points[f.paused_at])
                        raise RuntimeError(
                            f"staged forward: expected to reach {name!r} next, reached {where}"
                        )
                on_point(k)
                released[k] = True
            for f in fibers:
                f.resume()
                if not f.done:
                    raise RuntimeError(f"staged forward: {points[f.paused_at]!r} was reached twice")
            return [f.result for f in fibers]
        finally:
            for h in handles:
                h.remove()
            for f in fibers:
                f.cancel()


def staged_forward_fits(ctx: BlockContext, share: float = 0.5) -> bool:
    """Whether every batch's live activations of a paused block forward (bounded by the widths of all the
    block's Linear outputs plus two hidden states per token, float32) fit in ``share`` of the free memory of
    the block's device."""
    import torch

    tokens = sum(x.numel() // x.shape[-1] for x in ctx.inputs)
    hidden = ctx.inputs[0].shape[-1]
    width = 2 * hidden + sum(m.out_features for m in ctx.layer.modules() if isinstance(m, torch.nn.Linear))
    return tokens * width * 4 <= share * free_memory(ctx.inputs[0].device)


def free_memory(device) -> float:
    """Bytes free on ``device`` (CUDA: the driver's count; CPU: MemAvailable, else the free physical pages)."""
    import torch

    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import os

        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return float("inf")


class _Cancelled(BaseException):
    pass


class _Fiber:
    """Runs ``fn`` on a thread of its own, but only while the caller waits in ``resume()``: control passes back
    and forth like a coroutine (``pause()`` on the fiber's thread, ``resume()`` on the caller's), so exactly one
    of them runs at any time and nothing runs concurrently."""

    def __init__(self, fn, local: threading.local, index: int = 0):
        self._fn = fn
        self.index = index
        self._local = local
        self._go = threading.Semaphore(0)
        self._back = threading.Semaphore(0)
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._started = False
        self._cancelled = False
        self.done = False
        self.paused_at: int | None = None
        self.result = None
        self.error: BaseException | None = None

    def _main(self) -> None:
        self._local.fiber = self
        self._go.acquire()
        try:
            if not self._cancelled:
                self.result = self._fn()
        except _Cancelled:
            pass
        except BaseException as e:  # handed to the caller by resume()
            self.error = e
        finally:
            self.done = True
            self._back.release()

    def resume(self) -> None:
        if self.done:
            return
        if not self._started:
            self._started = True
            self._thread.start()
        self._go.release()
        self._back.acquire()
        if self.error is not None:
            err, self.error = self.error, None
            raise err

    def pause(self, where: int) -> None:
        self.paused_at = where
        self._back.release()
        self._go.acquire()
        if self._cancelled:
            raise _Cancelled

    def cancel(self) -> None:
        """Unwind a paused fiber (its activations are freed) and wait for its thread."""
        if not self._started or self.done:
            return
        self._cancelled = True
        self._go.release()
        self._back.acquire()
        self._thread.join()


class BlockMethod(Protocol):
    def quantize_block(self, ctx: BlockContext) -> dict[str, QuantizedLinear]:
        """Quantize ``ctx.targets`` in place (module weights become the dequantized values) and return them."""
        ...


# --------------------------------------------------------------------------------------------------------------
# source checkpoint (the llmq.io reader when present, else a minimal safetensors reader)
# --------------------------------------------------------------------------------------------------------------


class SourceModel:
    """The source HF directory through llmq.io's bounded safetensors reader, plus its config.json."""

    def __init__(self, path: Path):
        from llmq.io import open_checkpoint

        if not path.is_dir():
            raise BadInput(
                f"{path}: GPTQ/AWQ need a Hugging Face safetensors directory (convert a GGUF first)"
            )
        self.path = path
        self._reader = open_checkpoint(path)
        if self._reader.kind != "safetensors" or not self._reader.config:
            raise BadInput(f"{path} is not a Hugging Face model directory (no config.json)")
        self.config: dict[str, Any] = self._reader.config

    def names(self) -> list[str]:
        return self._reader.names()

    def infos(self) -> list:
        """The header's TensorInfos, in checkpoint order."""
        return list(self._reader.infos())

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._reader.info(name).shape)

    def dtype(self, name: str) -> str:
        return self._reader.info(name).dtype

    def read(self, name: str) -> torch.Tensor:
        if name not in self._reader.names():
            raise CorruptFile(f"{self.path}: tensor {name} is missing")
        return self._reader.read(name)

    def close(self) -> None:
        self._reader.close()


def open_source(src: Path) -> SourceModel:
    return SourceModel(Path(src))


# --------------------------------------------------------------------------------------------------------------
# metadata-only planning
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    arch: Arch
    n_layers: int
    targets: list[list[str]]  # per block, relative Linear names to quantize
    skipped: list[str] = field(default_factory=list)  # full names left unquantized (indivisible)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


def make_plan(reader: SourceModel, config: BlockwiseConfig) -> Plan:
    arch = for_model_type(reader.config)
    if isinstance(reader.config.get("text_config"), dict):
        raise UnsupportedArchitecture(
            f"{reader.path.name}: block-wise quantization of multimodal checkpoints is not supported yet; "
            "convert the language model first (llmq convert to GGUF and back)"
        )
    shapes = {name: reader.shape(name) for name in reader.names()}
    n = check_hf_model(arch, reader.config, shapes, reader.path.name).layers
    names = set(reader.names())
    targets, indivisible, shapes = [], [], {}
    for i in range(n):
        block = []
        for rel in arch.linears:
            full = arch.block_prefix(i) + rel
            if full + ".weight" not in names:
                raise UnsupportedArchitecture(
                    f"{full}.weight is missing: the checkpoint does not look like {arch.name}"
                )
            shape = reader.shape(full + ".weight")
            shapes[full] = shape
            if not is_selected(full, config.ignore, config.only):
                continue
            if config.group_size > 0 and shape[1] % config.group_size:
                indivisible.append(full)
                continue
            block.append(rel)
        targets.append(block)
    if indivisible and not config.skip_indivisible:
        shown = ", ".join(indivisible[:6]) + (
            f" and {len(indivisible) - 6} more" if len(indivisible) > 6 else ""
        )
        raise ShapeError(
            f"group size {config.group_size} does not divide the input columns of {shown} "
            f"({shapes[indivisible[0]][1]} columns); pick another --group-size or pass --skip-indivisible"
        )
    if not any(targets):
        raise BadInput("no Linear layer left to quantize (check --ignore / --only)")
    return Plan(arch, n, targets, indivisible, shapes)


def plan_output(src: Path, config: BlockwiseConfig, method_name: str = "gptq"):
    """The tensors the output will hold (names, dtypes, shapes), from the header alone."""
    reader = open_source(src)
    plan = make_plan(reader, config)
    if config.format != "fake-quant":
        return plan_packed(reader, plan, config, method_name)
    return reader.infos()


# --------------------------------------------------------------------------------------------------------------
# the model skeleton, block materialization and the first block's inputs
# --------------------------------------------------------------------------------------------------------------


def _skeleton(src: Path):
    import torch
    import transformers

    try:
        hf_config = transformers.AutoConfig.from_pretrained(str(src))
    except (ValueError, KeyError, OSError) as e:
        raise UnsupportedArchitecture(f"transformers cannot build the model of {src}: {e}") from e
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    return hf_config, model


def materialize(module, reader, prefix: str) -> None:
    """Give a meta module real float32 weights read from the checkpoint."""
    import torch

    module.to_empty(device="cpu")
    for name, p in module.named_parameters():
        t = reader.read(prefix + name)
        if tuple(t.shape) != tuple(p.shape):
            raise CorruptFile(
                f"{prefix + name}: shape {tuple(t.shape)} but the config implies {tuple(p.shape)}"
            )
        with torch.no_grad():
            p.copy_(t.to(torch.float32))
    for name, _b in module.named_buffers():
        raise UnsupportedArchitecture(f"{prefix + name}: blocks with buffers are not supported yet")


def to_device(obj, device):
    """Tensors inside nested tuples/lists/dicts moved to ``device`` (block kwargs hold rotary (cos, sin) pairs)."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def resolve_device(name: str):
    import torch

    from llmq.errors import BackendError

    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise BadInput(f"--device {name!r}: {e}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackendError(f"--device {name}: CUDA is not available here")
    return device


def check_samples(samples: torch.Tensor, vocab_size: int | None) -> None:
    if samples.dim() != 2 or samples.numel() == 0:
        raise CalibrationError(f"calibration samples must be a non-empty [nsamples, seqlen] tensor, got "
                               f"{tuple(samples.shape)}")  # fmt: skip
    if samples.shape[1] < 8:
        raise CalibrationError(f"calibration samples of {samples.shape[1]} tokens are too short (need >= 8)")
    if vocab_size and (int(samples.max()) >= vocab_size or int(samples.min()) < 0):
        raise CalibrationError("calibration token ids fall outside the model's vocabulary")


def capture_first_inputs(model, reader, samples: torch.Tensor) -> tuple[list, list]:
    """Run the embedding part of the real model and catch what it hands to block 0 (hidden + kwargs)."""
    import torch

    inner = model.model
    materialize(inner.embed_tokens, reader, "model.embed_tokens.")
    rotary = getattr(inner, "rotary_emb", None)
    if rotary is not None:  # its inv_freq buffer is computed, not stored: rebuild it for real
        inner.rotary_emb = type(rotary)(config=model.config)
    first = inner.layers[0]
    hidden, kwargs = [], []

    class Catcher(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attention_type = getattr(first, "attention_type", "full_attention")

        def forward(self, h, **kw):
            hidden.append(h.detach())
            kw = {k: v for k, v in kw.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
            kwargs.append(kw)
            raise StopForward

    inner.layers[0] = Catcher()
    per_batch = max(1, BATCH_TOKENS // samples.shape[1])
    try:
        with torch.no_grad():
            for start in range(0, samples.shape[0], per_batch):
                try:
                    inner(input_ids=samples[start : start + per_batch], use_cache=False)
                except StopForward:
                    pass
    finally:
        inner.layers[0] = first
        inner.embed_tokens.to("meta")
    return hidden, kwargs


# --------------------------------------------------------------------------------------------------------------
# the pipeline
# --------------------------------------------------------------------------------------------------------------


def forward_all(ctx: BlockContext) -> list[torch.Tensor]:
    return [ctx.forward(b).detach() for b in range(len(ctx.inputs))]


def load_samples(src: Path, config: BlockwiseConfig, tokenizer=None):
    from llmq.calib.samples import calibration_samples

    if tokenizer is None:
        import transformers

        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(src))
        except (OSError, ValueError) as e:
            raise BadInput(f"{src}: no usable tokenizer for calibration ({e})") from e
    return calibration_samples(tokenizer, config.calibration, config.nsamples, config.seqlen, config.seed)


def quantize_blockwise(src: Path, out: Path, config: BlockwiseConfig, method: BlockMethod, method_name: str, *,
                       force: bool = False, progress: Progress = no_progress, samples=None,
                       tokenizer=None) -> QuantizeResult:  # fmt: skip
    import torch

    from llmq.io.base import check_output

    t0 = time.perf_counter()
    check_output(out, force, [src])
    reader = open_source(src)
    plan = make_plan(reader, config)
    notes: list[str] = []
    if plan.skipped:
        notes.append(f"left unquantized (columns not divisible by group size {config.group_size}): "
                     + ", ".join(plan.skipped))  # fmt: skip
    if samples is None:
        progress("calibration", 0, 1)
        samples = load_samples(src, config, tokenizer)
    samples = torch.as_tensor(samples, dtype=torch.long)
    check_samples(samples, reader.config.get("vocab_size"))

    hf_config, model = _skeleton(src)
    torch.set_grad_enabled(False)
    resume = ResumeDir(out, fingerprint(src, config, method_name), config.resume)
    device = resolve_device(config.device)
    hidden, kwargs = capture_first_inputs(model, reader, samples)
    # the float stream starts from the same embeddings (nothing modifies a hidden state in place)
    floats = list(hidden) if getattr(config, "float_target", 0) > 0 else None
    if resume.done:
        notes.append(f"resumed after block {resume.done - 1}")
        floats = resume.load_hidden("float_hidden") if floats is not None else None
        hidden = resume.load_hidden()
    hidden, kwargs, floats = to_device(hidden, device), to_device(kwargs, device), to_device(floats, device)

    layers = model.model.layers
    try:
        _quantize_blocks(
            plan, layers, reader, device, method, resume, hidden, kwargs, floats, notes, progress
        )
    finally:
        resume.wait()  # an interrupted run leaves the last finished block complete on disk
    progress("writing", 0, 1)

    result = write_output(src, out, reader, plan, resume, config, method_name, force=force)
    resume.remove()
    reader.close()
    progress("writing", 1, 1)
    result.notes = notes + result.notes
    result.seconds = time.perf_counter() - t0
    return result


def _quantize_blocks(plan: Plan, layers, reader, device, method: BlockMethod, resume: ResumeDir, hidden: list,
                     kwargs: list, floats: list | None, notes: list[str], progress: Progress) -> None:  # fmt: skip
    for i in range(plan.n_layers):
        if i < resume.done:
            continue
        prefix = plan.arch.block_prefix(i)
        layer = layers[i]
        materialize(layer, reader, prefix)
        layer.to(device)
        ctx = BlockContext(
            i, prefix, layer, plan.arch, plan.targets[i], hidden, kwargs, notes, float_inputs=floats
        )
        records = method.quantize_block(ctx) if ctx.targets else {}
        hidden = ctx.outputs if ctx.outputs is not None else forward_all(ctx)
        if floats is not None:
            # a block without targets leaves its weights alone: its float outputs are those of the same forward
            floats = (
                ctx.float_outputs
                if ctx.float_outputs is not None
                else forward_all(replace(ctx, inputs=floats))
            )
        resume.save_block(i, block_tensors(layer, records), hidden, floats)
        layers[i] = layer.to("meta")
        progress(f"block {i + 1}/{plan.n_layers}", i + 1, plan.n_layers)
