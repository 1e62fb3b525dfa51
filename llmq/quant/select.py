"""Which Linear layers a method quantizes: the one pattern language of ``--ignore`` and ``--only``.

A pattern is matched against a module name (the tensor name without ``.weight``, e.g.
``model.layers.3.mlp.down_proj``):

- ``re:REGEX`` — a Python regular expression, searched anywhere in the name (``re:down_proj$``,
  ``re:^model\\.layers\\.(0|1)\\.``);
- anything else is a glob (``*``, ``?``, ``[...]``, case-sensitive) that matches when it covers the whole name
  or a run of whole dot-separated parts of it: ``lm_head``, ``q_proj``, ``mlp``, ``layers.0``,
  ``*.mlp.*`` and ``model.layers.*.self_attn.*`` all work; ``proj`` alone matches nothing (use ``*proj``).

``--only`` (when given) keeps just the modules that match one of its patterns and overrides the default
exclusions (:data:`DEFAULT_IGNORE`), so ``--only lm_head`` quantizes the head; ``--ignore`` always removes.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence

from llmq.errors import BadInput
from llmq.formats.base import LayerSpec
from llmq.io.base import TensorInfo

# modules left in full precision unless --only names them: embeddings, the output head, norms
DEFAULT_IGNORE = ("*embed*", "*lm_head*", "*wte*", "*wpe*", "re:^output$", "*norm*")
FLOAT_DTYPES = ("F32", "F16", "BF16")


def check_patterns(patterns: str | Iterable[str]) -> tuple[str, ...]:
    """The patterns as a tuple (one string is one pattern); a bad ``re:`` expression is a BadInput naming it."""
    out = (patterns,) if isinstance(patterns, str) else tuple(patterns)
    for p in out:
        if not p or p == "re:":
            raise BadInput("empty --ignore/--only pattern")
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise BadInput(f"bad pattern {p!r}: {e}") from None
    return out


def matches(name: str, pattern: str) -> bool:
    """Whether module ``name`` matches one pattern (see the module docstring)."""
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return any(
        fnmatch.fnmatchcase(name, p) for p in (pattern, f"*.{pattern}", f"{pattern}.*", f"*.{pattern}.*")
    )


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    return any(matches(name, p) for p in patterns)


def is_selected(name: str, ignore: Sequence[str] = (), only: Sequence[str] = (),
                default_ignore: Sequence[str] = DEFAULT_IGNORE) -> bool:  # fmt: skip
    """Whether module ``name`` is quantized under ``--ignore``/``--only`` and the default exclusions."""
    if only:
        if not matches_any(name, only):
            return False
    elif matches_any(name, default_ignore):
        return False
    return not matches_any(name, ignore)


def select_layers(infos: Iterable[TensorInfo], ignore: Sequence[str] = (), only: Sequence[str] = (),
                  default_ignore: Sequence[str] = DEFAULT_IGNORE) -> list[LayerSpec]:  # fmt: skip
    """The Linear weights to quantize from a header: 2-D floating ``*.weight`` tensors that :func:`is_selected`."""
    ignore, only = check_patterns(ignore), check_patterns(only)
    layers = []
    for i in infos:
        if not i.name.endswith(".weight") or len(i.shape) != 2 or i.dtype not in FLOAT_DTYPES:
            continue
        mod = i.name[: -len(".weight")]
        if is_selected(mod, ignore, only, default_ignore):
            layers.append(LayerSpec(name=mod, out_features=int(i.shape[0]), in_features=int(i.shape[1])))
    if not layers:
        raise BadInput("no Linear weights selected for quantization (check --only/--ignore)")
    return layers
