"""The progress callback every long-running step takes: ``progress(stage, done, total)``.

The CLI passes a rich progress bar; library callers pass nothing (:func:`no_progress`).
"""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str, float, float], None]


def no_progress(stage: str, done: float, total: float) -> None:
    return None
