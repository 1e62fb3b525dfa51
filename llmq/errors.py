"""Typed errors raised by the library. The CLI maps them to one-line messages (llmq.cli.app.ERROR_TABLE).

Library code never calls exit() or prints; it raises one of these.
"""

from __future__ import annotations


class LlmqError(Exception):
    """Base class of every error llmq raises on purpose."""

    exit_code = 1


class BadInput(LlmqError):
    """The user gave a path, option or value that cannot work (missing file, bad flag combination...)."""

    exit_code = 2


class CorruptFile(BadInput):
    """A checkpoint/header is truncated, malformed or inconsistent (offsets, lengths, dtypes)."""


class BadConfig(BadInput):
    """A config.json or GGUF metadata value, or a tensor, is missing, mistyped or inconsistent with the
    architecture (found at plan time, before anything is written)."""


class UnsupportedArchitecture(LlmqError):
    """The model architecture is not (yet) supported by this operation."""

    exit_code = 3


class UnsupportedType(LlmqError):
    """A tensor/quantization type that this operation cannot handle."""

    exit_code = 3


class ShapeError(BadInput):
    """Tensor shapes that do not fit the requested operation (e.g. not divisible by the group size)."""


class OutputExists(BadInput):
    """The output already exists and --force was not given."""


class UnsafeCheckpoint(BadInput):
    """A pickle-based checkpoint was refused (needs an explicit opt-in)."""


class UnsafePath(BadInput):
    """A file of a model resolves outside its directory through a symlink (see llmq.io.paths)."""


class MissingDependency(LlmqError):
    """An optional package is needed (the message says which extra installs it)."""

    exit_code = 4


class CalibrationError(BadInput):
    """Calibration / evaluation text is unusable (empty, too short, tokenizes to nothing...)."""


class BackendError(LlmqError):
    """A backend (transformers, llama.cpp, bitsandbytes...) failed to load or run the model."""

    exit_code = 5


class DiskFull(LlmqError):
    """The disk (or the user's quota) ran out while writing an output; nothing partial is left."""

    exit_code = 6


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP arrived (see llmq.io.temporaries.interrupts_unwind): raised in the main thread
    so that every ``with`` block unwinds and removes its temporaries. A KeyboardInterrupt, so that no
    ``except Exception`` swallows it. Exit code 128 + the signal's number, as a shell reports it."""

    def __init__(self, signum: int):
        import signal

        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


def require(module: str, extra: str):
    """Import an optional module or raise MissingDependency naming the extra that provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise MissingDependency(f"{module} is not installed: pip install 'llmq[{extra}]' ({e})") from e
