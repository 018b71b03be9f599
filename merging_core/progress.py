"""Progress reporting shared by the CLI (tqdm bars on a terminal) and the app (gr.Progress).

Engine functions take `progress: ProgressFn | None`, a callable `(fraction in [0, 1], description)`.
With None, long loops draw a tqdm bar on stderr when it is a terminal and stay silent otherwise.

Every long loop reports progress at least once per step (a tensor, a batch, a point, a training step),
so the callback is also how work is stopped: a callback that raises `Cancelled` ends the job there,
and the engine's atomic writers leave nothing half-written behind.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

from .errors import MergeLabError

ProgressFn = Callable[[float, str], None]
T = TypeVar("T")


class Cancelled(MergeLabError):
    """The job was stopped by its user (raised from a progress callback)."""

    def __init__(self, message: str = "stopped before it finished; nothing was saved from this run"):
        super().__init__(message)


def track(items: Iterable[T], total: int, desc: str, progress: ProgressFn | None) -> Iterator[T]:
    """Iterate `items`, reporting progress through `progress` or a terminal-only tqdm bar."""
    if progress is None:
        yield from tqdm(items, total=total, desc=desc, disable=None, leave=False)
        return
    for i, item in enumerate(items):
        progress(i / max(total, 1), desc)
        yield item
    progress(1.0, desc)


def scaled(progress: ProgressFn | None, start: float, end: float, prefix: str = "") -> ProgressFn | None:
    """A sub-range of a parent progress: a step of a multi-step job reports 0..1 of its own share."""
    if progress is None:
        return None
    return lambda fraction, desc: progress(start + (end - start) * fraction, f"{prefix}{desc}")
