"""Progress reporting shared by the CLI (tqdm bars on a terminal) and the app (gr.Progress).

Engine functions take `progress: ProgressFn | None`, a callable `(fraction in [0, 1], description)`.
With None, long loops draw a tqdm bar on stderr when it is a terminal and stay silent otherwise.

Every long loop reports progress at least once per step (a tensor, a batch, a point, a training step),
so the callback is also how work is stopped: a callback that raises `Cancelled` ends the job there,
and the engine's atomic writers leave nothing half-written behind.
"""

from __future__ import annotations

import math
import time
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


SETTLE = 1.0  # seconds of a stage before its rate is trusted for an estimate


def with_eta(progress: ProgressFn | None, *, clock: Callable[[], float] = time.monotonic,
             settle: float = SETTLE) -> ProgressFn | None:
    """`progress` whose descriptions end with the time left of this stage ("batch 3/16, ~40 s left"),
    from the rate since now: elapsed × (1 − fraction) / fraction, once the stage has run `settle` seconds."""
    if progress is None:
        return None
    started = clock()

    def report(fraction: float, desc: str) -> None:
        elapsed = clock() - started
        left = time_left(elapsed, fraction, 1.0) if elapsed >= settle else ""
        progress(fraction, f"{desc}, {left}" if left else desc)

    return report


def time_left(elapsed: float, done: float, total: float) -> str:
    """"~X s left" for `total` units of work, `done` of them in `elapsed` seconds, from the rate so far;
    "" while nothing is done yet (no rate) or everything is."""
    if not math.isfinite(done) or done <= 0 or done >= total or elapsed <= 0:
        return ""
    return remaining(elapsed / done * (total - done))


def remaining(seconds: float | None) -> str:
    """'~40 s left', '~3 min left', '~1.5 h left', or '' without an estimate."""
    if seconds is None:
        return ""
    if seconds < 90:
        return f"~{max(1, round(seconds))} s left"
    if seconds < 90 * 60:
        return f"~{round(seconds / 60)} min left"
    return f"~{seconds / 3600:.1f} h left"
