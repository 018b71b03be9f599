"""The engine's in-memory caches: bounded in bytes, dropped when idle, and a way to give memory back.

Every in-memory cache of the engine (tokenized splits in `encode`, loaded tokenizers in `models`) is a
`Cache` registered here. All of them together hold at most `MERGELAB_CACHE_MB` megabytes (estimated
from each entry's size; default 512): when a new entry would go over, the least recently used entries,
of any cache, are dropped first. An entry not used for `MERGELAB_CACHE_IDLE_S` seconds (default 300)
expires. Both are read on every use, so they can be changed in a running process; `MERGELAB_CACHE_MB=0`
keeps nothing in memory, `MERGELAB_CACHE_IDLE_S=0` never expires entries for being idle.

Dropping an entry only drops the cache's reference: a job that holds the value keeps it. Nor does
freeing memory give it back to the operating system: glibc's malloc keeps it in its arenas (measured:
an app left at 1.86 GB after eight actions on MiniLM-sized models, while its caches held ~20 MB and no
model or tensor was still alive; `malloc_trim` gave back 1.1 GB of it). So:

- `trim()` returns the free heap to the OS (glibc's `malloc_trim(0)`; a no-op elsewhere);
- `clear()` drops every entry, collects garbage and trims;
- `reuse_buffers()` (every merge calls it) has glibc reuse a streamed merge's slice buffers from its heap;
- `limit_arenas()` (the app calls it before its server starts) caps malloc at two arenas, since
  `malloc_trim` cannot give back the free top of a thread's own arena and a server's threads each get
  one otherwise (unless `MALLOC_ARENA_MAX` is set, which glibc then honours instead);
- `start_janitor()` (the app calls it) starts a thread that trims within seconds after jobs end and runs
  `clear()` once the process has been idle for `MERGELAB_CACHE_IDLE_S`: no cache used and no job
  running (its `busy` callbacks say so).
"""

from __future__ import annotations

import ctypes
import functools
import gc
import math
import os
import sys
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import torch

from .errors import MergeLabError

DEFAULT_MB = 512
DEFAULT_IDLE_S = 300.0
_LOCK = threading.RLock()  # one lock for every cache: the byte budget is shared
_CACHES: weakref.WeakSet[Cache] = weakref.WeakSet()
_last_activity = time.monotonic()  # the last use of any cache (or `touch()`)


def _number(name: str, default: float) -> float:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise MergeLabError(f"{name}={text!r} is not a number") from None
    if not math.isfinite(value):
        raise MergeLabError(f"{name}={text!r} is not a finite number")
    return max(0.0, value)


def budget_bytes() -> int:
    """The most all caches together hold (`MERGELAB_CACHE_MB`, megabytes; 0: nothing is kept)."""
    return int(_number("MERGELAB_CACHE_MB", DEFAULT_MB) * 2**20)


def idle_seconds() -> float:
    """How long an unused entry is kept (`MERGELAB_CACHE_IDLE_S`; 0: until the byte budget drops it)."""
    return _number("MERGELAB_CACHE_IDLE_S", DEFAULT_IDLE_S)


def touch() -> None:
    """Note activity (the janitor waits for a whole idle period after the last one)."""
    global _last_activity
    _last_activity = time.monotonic()


class Cache:
    """A least-recently-used mapping whose entries count against the shared byte budget and expire when
    idle. `sizeof(value)` estimates an entry's bytes; `max_entries` optionally bounds the count too."""

    def __init__(self, name: str, sizeof: Callable[[Any], int], max_entries: int | None = None) -> None:
        self.name = name
        self._sizeof = sizeof
        self._max_entries = max_entries
        self._entries: OrderedDict[Hashable, tuple[Any, int, float]] = OrderedDict()  # key -> (value, bytes, used)
        with _LOCK:
            _CACHES.add(self)

    def get(self, key: Hashable, default: Any = None) -> Any:
        with _LOCK:
            _expire_locked(time.monotonic())
            found = self._entries.get(key)
            if found is None:
                return default
            now = time.monotonic()
            self._entries[key] = (found[0], found[1], now)
            self._entries.move_to_end(key)
            touch()
            return found[0]

    def put(self, key: Hashable, value: Any) -> Any:
        """Keep `value` under `key` unless the key is already there; returns the value kept (the earlier one
        when two callers race to fill the same key), or `value` when it does not fit in the budget."""
        size = max(0, int(self._sizeof(value)))
        with _LOCK:
            now = time.monotonic()
            touch()
            if key in self._entries:
                kept = self._entries[key]
                self._entries[key] = (kept[0], kept[1], now)
                self._entries.move_to_end(key)
                return kept[0]
            budget = budget_bytes()
            if size > budget:
                return value
            self._entries[key] = (value, size, now)
            while self._max_entries is not None and len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)
            _expire_locked(now)
            _evict_locked(budget)
            return value

    def pop(self, key: Hashable, default: Any = None) -> Any:
        with _LOCK:
            found = self._entries.pop(key, None)
            return default if found is None else found[0]

    def clear(self) -> None:
        with _LOCK:
            self._entries.clear()

    @property
    def nbytes(self) -> int:
        with _LOCK:
            return sum(size for _, size, _ in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def __repr__(self) -> str:
        return f"Cache({self.name!r}, {len(self)} entries, {self.nbytes / 2**20:.1f} MB)"


def _expire_locked(now: float) -> int:
    idle = idle_seconds()
    dropped = 0
    if idle <= 0:
        return 0
    for cache in list(_CACHES):
        entries = cache._entries
        while entries and now - next(iter(entries.values()))[2] > idle:  # oldest first: stop at a fresh one
            entries.popitem(last=False)
            dropped += 1
    return dropped


def _evict_locked(budget: int) -> None:
    caches = [c for c in _CACHES if c._entries]
    total = sum(size for c in caches for _, size, _ in c._entries.values())
    while total > budget and caches:
        oldest = min(caches, key=lambda c: next(iter(c._entries.values()))[2])
        _, (_, size, _) = oldest._entries.popitem(last=False)
        total -= size
        if not oldest._entries:
            caches.remove(oldest)


def expire() -> int:
    """Drop the entries idle longer than `MERGELAB_CACHE_IDLE_S`; returns how many."""
    with _LOCK:
        return _expire_locked(time.monotonic())


def stats() -> dict[str, dict[str, int]]:
    """{cache name: {"entries", "bytes"}} of every live cache."""
    with _LOCK:
        return {c.name: {"entries": len(c), "bytes": c.nbytes} for c in _CACHES}


def rss_bytes() -> int | None:
    """This process's resident memory (Linux: /proc/self/status VmRSS), or None where it is not known."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """glibc, or None (macOS, Windows, musl: none of the calls below is made there)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


_M_ARENA_MAX = -8  # mallopt parameter (malloc.h)
SERVER_ARENAS = 2


def limit_arenas(arenas: int = SERVER_ARENAS) -> bool:
    """Have glibc's malloc serve threads started from now on from at most `arenas` arenas (a server's
    worker threads otherwise get an arena each, up to 8 per core, and `malloc_trim` cannot give back the
    free top of a thread's arena: a test app kept ~180 MB more after 20 requests that way). Call it before
    starting threads. Left alone where MALLOC_ARENA_MAX is set (glibc read it) or glibc is absent; True
    when set."""
    libc = _libc()
    if libc is None or os.environ.get("MALLOC_ARENA_MAX"):
        return False
    return bool(libc.mallopt(_M_ARENA_MAX, int(arenas)))


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
STREAM_MMAP = 64 << 20  # bytes: buffers below this come from the heap during a streamed merge
STREAM_TRIM = 128 << 20  # bytes of free heap top glibc keeps before giving it back by itself


def reuse_buffers() -> bool:
    """Have glibc serve buffers under 64 MB (every slice of a streamed merge) from its heap and keep up
    to 128 MB of it free for the next slice, instead of a fresh memory map per buffer that the kernel
    must fault in and zero: a streamed average of two 1.1B-parameter bf16 models took 11.3 s with a
    fresh map per buffer and 4.9 s with reuse, its peak anonymous memory 211 vs 371 MB (bounded either
    way; `trim()` gives the heap back when the merge ends). Left alone where MALLOC_MMAP_THRESHOLD_ or
    MALLOC_TRIM_THRESHOLD_ is set (glibc read them) or glibc is absent; True when set."""
    libc = _libc()
    if libc is None or os.environ.get("MALLOC_MMAP_THRESHOLD_") or os.environ.get("MALLOC_TRIM_THRESHOLD_"):
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, STREAM_MMAP)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, STREAM_TRIM))


def trim() -> bool:
    """Return the free part of the heap to the operating system (glibc's `malloc_trim(0)`; the GIL is
    released meanwhile), and free GPU memory torch holds unused where CUDA is in use. Frees nothing that
    is in use; True when glibc was asked."""
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def release() -> bool:
    """Collect garbage (objects only reference cycles keep), then `trim()`."""
    gc.collect()
    return trim()


def clear() -> dict[str, Any]:
    """Drop every entry of every cache, collect garbage and return the freed memory to the operating
    system. A job still using a value keeps it (only the caches' references go). Returns what was
    dropped and the resident size before and after (None where unknown)."""
    before = rss_bytes()
    with _LOCK:
        caches = list(_CACHES)
        entries = sum(len(c) for c in caches)
        cached = sum(c.nbytes for c in caches)
        for cache in caches:
            cache._entries.clear()
    trimmed = release()
    return {"entries": entries, "cached_bytes": cached, "rss_before": before, "rss_after": rss_bytes(),
            "trimmed": trimmed}


class _Janitor(threading.Thread):
    """Watches the process every few seconds. When jobs ran (or caches were used) since its last look and
    none runs now, it trims the heap (`trim()`: what the jobs freed goes back to the operating system);
    after `MERGELAB_CACHE_IDLE_S` with no cache used and no job running, it clears the caches (`clear()`),
    once per idle period."""

    def __init__(self) -> None:
        super().__init__(name="mergelab-cache-janitor", daemon=True)
        self.busy: list[Callable[[], bool]] = []
        self.cleared: list[dict[str, Any]] = []  # the last few clear() reports, newest last
        self.trims = 0  # heap trims after jobs
        self._cleaned_after: float | None = None  # `_last_activity` when it last cleared
        self._trimmed_after: float | None = None  # `_last_activity` when it last trimmed
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.interval()):
            try:
                self.tick()
            except Exception:  # noqa: BLE001, S110 - a janitor must never die of one bad round
                pass

    @staticmethod
    def interval() -> float:
        idle = idle_seconds()
        return 5.0 if idle <= 0 else min(5.0, max(0.25, idle / 4))

    def is_busy(self) -> bool:
        for check in list(self.busy):
            try:
                if check():
                    return True
            except ReferenceError:  # what it watched is gone (a closed app)
                self.busy.remove(check)
            except Exception:  # noqa: BLE001, S112 - a broken callback counts as idle: clearing only drops references
                continue
        return False

    def tick(self) -> dict[str, Any] | None:
        """One look; returns the report of `clear()` when it cleared."""
        if self.is_busy():
            touch()  # idle time counts from the end of the last job
            return None
        seen = _last_activity
        if self._trimmed_after != seen:  # work since the last look, none now: give back what it freed
            trim()
            self.trims += 1
            self._trimmed_after = seen
        idle = idle_seconds()
        if idle <= 0 or time.monotonic() - seen < idle or self._cleaned_after == seen:
            return None
        report = clear()
        self._cleaned_after = seen
        self.cleared = [*self.cleared[-9:], report]
        return report

    def stop(self) -> None:
        self._halt.set()


_janitor: _Janitor | None = None


def start_janitor(busy: Callable[[], bool] | None = None) -> _Janitor:
    """Start the process's one janitor thread (later calls add their `busy` callback to it): it trims the
    heap after jobs and calls `clear()` once the process has been idle for `MERGELAB_CACHE_IDLE_S`
    (see `_Janitor`). `busy()` says whether a job is
    running (the idle time counts from the end of the last one); it raises ReferenceError once what it
    watches is gone, and is then forgotten."""
    global _janitor
    with _LOCK:
        if _janitor is None or not _janitor.is_alive():
            _janitor = _Janitor()
            _janitor.start()
        if busy is not None:
            _janitor.busy.append(busy)
        return _janitor
