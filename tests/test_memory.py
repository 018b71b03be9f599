"""Memory: the engine's caches are bounded in bytes and expire when idle, and an app that served many
requests gives its memory back once idle.

The end-to-end test runs `python app.py` in a subprocess (its resident size is then the app's alone,
not this test process's) on pico checkpoints, reads VmRSS / VmHWM from /proc/<pid>/status, drives 20
mixed actions through gradio_client and waits for the idle janitor (MERGELAB_CACHE_IDLE_S, short here).
Measured on 2 CPU cores: post-startup level ~670 MB, peak ~1.5 GB, idle again +9..14%; the same test
against the app without its janitor and arena limit: +53% (it fails).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from merging_core import caches, encode, models, tasks

from .conftest import REPO, copy_model, make_pico

# --- the caches -------------------------------------------------------------------------------------


@pytest.fixture()
def cache_env(monkeypatch):
    """Empty caches before and after, settings a test sets through the environment, and the process's
    janitor (an app built by another test starts one) paused: it reads the same settings."""
    if caches._janitor is not None:
        monkeypatch.setattr(caches._janitor, "tick", lambda: None)
    caches.clear()
    yield monkeypatch
    caches.clear()


def test_caches_are_bounded_in_bytes_least_recently_used_first(cache_env):
    cache_env.setenv("MERGELAB_CACHE_MB", "1")
    a = caches.Cache("test-a", sizeof=len)
    b = caches.Cache("test-b", sizeof=len)
    a.put("x", b"x" * 400_000)
    b.put("y", b"y" * 400_000)
    assert a.get("x") is not None  # x is now the most recently used
    a.put("z", b"z" * 400_000)  # 1.2 MB > 1 MB: the least recently used entry of any cache goes
    assert "y" not in b and "x" in a and "z" in a
    assert a.nbytes == 800_000
    too_big = b"w" * 2_000_000
    assert a.put("w", too_big) is too_big and "w" not in a  # returned to the caller, not kept
    cache_env.setenv("MERGELAB_CACHE_MB", "0")
    a.put("v", b"v")
    assert "v" not in a


def test_caches_expire_when_idle(cache_env):
    cache_env.setenv("MERGELAB_CACHE_IDLE_S", "0.2")
    cache = caches.Cache("test-idle", sizeof=len)
    cache.put("k", b"value")
    assert cache.get("k") == b"value"
    time.sleep(0.3)
    assert cache.get("k") is None
    cache.put("k", b"value")
    time.sleep(0.3)
    assert caches.expire() == 1 and len(cache) == 0


def test_settings_that_are_not_numbers_are_refused(cache_env):
    cache_env.setenv("MERGELAB_CACHE_MB", "lots")
    with pytest.raises(caches.MergeLabError, match="MERGELAB_CACHE_MB"):
        caches.budget_bytes()
    cache_env.setenv("MERGELAB_CACHE_IDLE_S", "nan")
    with pytest.raises(caches.MergeLabError, match="MERGELAB_CACHE_IDLE_S"):
        caches.idle_seconds()


def test_clear_drops_every_cache_but_not_what_a_job_holds(cache_env, tokenizer):
    encoded = encode.encode(tasks.get_task("sst2"), "dev", tokenizer)
    assert len(encode._MEMORY) >= 1 and encode._MEMORY.nbytes >= encoded.nbytes > 0
    assert encoded.head(5).nbytes == encoded.nbytes  # views share their storage: counted once
    report = caches.clear()
    assert len(encode._MEMORY) == 0 and len(models._TOKENIZERS) == 0
    assert report["entries"] >= 1 and report["cached_bytes"] >= encoded.nbytes
    assert report["trimmed"] == (caches._libc() is not None)
    assert encoded.ids.sum() > 0  # the caller's value is untouched: only the cache's reference went


def test_an_explicit_malloc_arena_max_is_left_to_glibc(cache_env):
    cache_env.setenv("MALLOC_ARENA_MAX", "4")
    assert caches.limit_arenas() is False


def test_tokenizer_fingerprints_do_not_keep_tokenizers_alive(cache_env, pico):
    import gc
    import weakref

    loaded = models.load_tokenizer(models.resolve(str(pico("sst2"))))
    fingerprint = encode.tokenizer_fingerprint(loaded)
    gone = weakref.ref(loaded)
    caches.clear()
    del loaded
    gc.collect()
    assert gone() is None  # neither cache keeps it
    again = models.load_tokenizer(models.resolve(str(pico("sst2"))))
    assert encode.tokenizer_fingerprint(again) == fingerprint


def test_janitor_trims_after_jobs_and_clears_once_per_idle_period_never_while_busy(cache_env):
    cache_env.setenv("MERGELAB_CACHE_IDLE_S", "0.2")
    janitor = caches._Janitor()  # not started: ticked by hand
    working = threading.Event()
    janitor.busy.append(working.is_set)
    cache = caches.Cache("test-janitor", sizeof=len)
    cache.put("k", b"v")
    assert janitor.tick() is None and janitor.trims == 1  # used just now: the heap trimmed, the cache kept
    assert janitor.tick() is None and janitor.trims == 1  # nothing since
    working.set()
    time.sleep(0.3)
    assert janitor.tick() is None and "k" in cache and janitor.trims == 1  # a job runs: nothing done
    working.clear()
    assert janitor.tick() is None and janitor.trims == 2  # the job ended: trimmed; idle time starts now
    time.sleep(0.3)
    report = janitor.tick()
    assert report is not None and report["entries"] >= 1 and "k" not in cache
    time.sleep(0.3)
    assert janitor.tick() is None and janitor.trims == 2  # nothing happened since: not again

    def closed() -> bool:
        raise ReferenceError

    janitor.busy.append(closed)
    assert not janitor.is_busy() and janitor.busy == [working.is_set]  # a closed app's callback is forgotten


# --- the app over many requests ----------------------------------------------------------------------

ACTIONS = 20
IDLE_S = 1  # the app's MERGELAB_CACHE_IDLE_S in this test
SLACK = 0.20  # after the actions and the idle period, RSS within 20% of the post-startup level
PEAK_MB = 2000  # the highest RSS allowed during the actions (measured 1.4-1.6 GB, see the print)


def _status_mb(pid: int) -> dict[str, float]:
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0]) / 1024
    return found


def _reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the peak read later is the actions' own."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@pytest.fixture()
def app_process(app_home, pico, tmp_path):
    """`python app.py` serving a zoo of pico models (two SST-2, one CoLA, an MLM model and its permuted
    copy, two LoRA modules) with a short cache idle time; yields (process, url)."""
    import merging_core as ml
    from merging_core.align import permute_checkpoint

    zoo = app_home / "zoo"
    for name, task, seed in (("pico-sst2-b", "sst2", 5), ("pico-cola", "cola", 1)):
        entry = copy_model(pico(task, seed=seed), zoo / name)
        (entry / "mergelab.json").write_text(json.dumps({"task": task, "kind": "full", "seed": seed, "steps": 0}))
    # a wider pico for alignment (hidden 256): its activations are what an alignment holds at once, so a
    # few of them make a peak of a few hundred MB that malloc keeps unless it is told to give it back
    make_pico(zoo / "pico-mlm", "wikitext2", 0, hidden_size=256, intermediate_size=1024)
    (zoo / "pico-mlm" / "mergelab.json").write_text(json.dumps({"task": "wikitext2", "kind": "full", "seed": 0}))
    permute_checkpoint("pico-mlm", zoo / "pico-mlm-permuted", seed=2)
    for task in ("cola", "emotion"):
        ml.train(ml.TrainConfig(task=task, base=str(pico(None)), steps=2, batch_size=4, peft="lora", eval_limit=8),
                 zoo / f"lora-{task}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
           "MERGELAB_CACHE_IDLE_S": str(IDLE_S), "MERGELAB_CACHE_MB": "256", "PYTHONUNBUFFERED": "1"}
    env.pop("MERGELAB_PUBLIC", None)
    log = tmp_path / "app.log"  # a file, not a pipe: a pipe nobody reads would block a talkative app
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "app.py"], cwd=REPO, env=env, stdout=out, stderr=out)
    process.log = log
    try:
        yield process, f"http://127.0.0.1:{port}/"
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _connect(process: subprocess.Popen, url: str):
    import gradio_client

    deadline = time.monotonic() + 90
    while True:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return gradio_client.Client(url, verbose=False, analytics_enabled=False)
        except Exception:  # noqa: BLE001 - not listening yet
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the app did not start: {process.log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.5)


def _settle(pid: int, seconds: float) -> float:
    """The RSS after the app has been idle long enough for its janitor to clear (polled; the lowest)."""
    deadline = time.monotonic() + seconds
    lowest = _status_mb(pid)["VmRSS"]
    while time.monotonic() < deadline:
        time.sleep(0.5)
        lowest = min(lowest, _status_mb(pid)["VmRSS"])
    return lowest


@pytest.mark.integration
def test_the_app_gives_memory_back_after_many_actions(app_process):
    pytest.importorskip("gradio_client")
    from merging_core.arch import GROUPS

    process, url = app_process
    client = _connect(process, url)
    pid = process.pid
    started = _status_mb(pid)["VmRSS"]
    merge = {"base": "", "params": {}, "components": list(GROUPS), "fallback": "average", "heads": "auto",
             "compare": True, "multitask": ""}

    def plan(n: int) -> list[tuple[str, Callable[[int], Any]]]:
        """The five actions, each reading `n` examples (align: activations of 8n inputs, the heaviest)."""
        return [
            ("evaluate", lambda i: client.predict(("pico-sst2", "pico-sst2-b", "pico-cola")[i % 3], ["sst2", "cola"],
                                                  "dev", 4 * n, api_name="/evaluate")),
            ("merge", lambda i: client.predict(models=["pico-sst2", ("pico-sst2-b", "pico-cola")[i % 2]],
                                               method="average", out=f"m{i}", limit=n, **merge, api_name="/merge")),
            ("curve", lambda i: client.predict("pico-sst2", ("pico-sst2-b", "pico-cola")[i % 2], ["sst2"], 5, "line",
                                               n, "", "", [], 10, api_name="/curve")),
            ("align", lambda i: client.predict("pico-mlm", "pico-mlm-permuted", "all", "head-perm", "first", True,
                                               "wikitext2", 8 * n, [], 3, n, api_name="/align")),
            ("ensemble", lambda i: client.predict("sst2", "lora", [], "loss", -1.0, "model", 8, "0", 5, n,
                                                  api_name="/ensemble")),
        ]

    # The post-startup level: after one round of every action at the smallest size, idle. Each action's
    # first call imports what it needs (transformers, peft, plotly, scipy, ...) and sets up torch: memory
    # the process keeps for its lifetime whatever it serves, so it belongs to the level, not to growth.
    began = time.monotonic()
    for i, (_, call) in enumerate(plan(1)):
        call(i)
    warm = _status_mb(pid)["VmRSS"]
    baseline = _settle(pid, IDLE_S + 3)
    _reset_peak(pid)
    actions = plan(16)
    timings = []
    for i in range(ACTIONS):
        name, call = actions[i % len(actions)]
        t0 = time.monotonic()
        call(i + len(actions))
        timings.append(f"{name} {time.monotonic() - t0:.1f}s")
    after = _status_mb(pid)
    settled = _settle(pid, IDLE_S + 3)
    print(f"\nRSS of the app (MB): at startup {started:.0f}; after one small round of each action {warm:.0f}, idle "
          f"{baseline:.0f} (the post-startup level); after {ACTIONS} more actions {after['VmRSS']:.0f} "
          f"(peak {after['VmHWM']:.0f}); idle again {settled:.0f} ({(settled / baseline - 1) * 100:+.1f}%); "
          f"{time.monotonic() - began:.0f} s in all ({', '.join(timings)})")
    assert after["VmHWM"] < PEAK_MB, f"peak RSS {after['VmHWM']:.0f} MB during the actions"
    assert settled <= baseline * (1 + SLACK), (f"RSS {settled:.0f} MB once idle, {baseline:.0f} MB after startup: "
                                               "memory kept across actions")
