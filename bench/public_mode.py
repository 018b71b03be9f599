"""Public mode under pressure, measured through gradio_client against the app in this process:

- quota: N merges of the packaged MiniLM (~90 MB each) in one session under a disk quota; the disk the
  session uses, how many merges were accepted and how many refused;
- Stop: a long curve is stopped; the seconds until its job has ended, until a request queued behind it
  has finished, and until the process's CPU use falls to idle (sampled every 50 ms);
- concurrency: S sessions at once, each merging two small checkpoints and scoring its result; errors
  and wall time.

    MERGELAB_DATA=../shared/data python bench/public_mode.py --merges 100 --quota-mb 500 --sessions 20
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import print_table, write_results

import psutil


def cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--merges", type=int, default=100)
    parser.add_argument("--quota-mb", type=int, default=500)
    parser.add_argument("--sessions", type=int, default=20)
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="mergelab-public-bench-"))
    os.environ.update({"MERGELAB_HOME": str(home), "MERGELAB_PUBLIC": "1", "HF_HUB_OFFLINE": "1",
                       "MERGELAB_MAX_SESSION_MB": str(args.quota_mb), "GRADIO_ANALYTICS_ENABLED": "False"})
    import gradio_client

    import merging_core as ml
    from tests.conftest import make_pico
    from views import build_app

    for name, (task, seed) in {"pico-a": ("sst2", 0), "pico-b": ("sst2", 1)}.items():
        make_pico(ml.settings.zoo_dir() / name, task, seed)
    demo = build_app()
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True)
    warnings.simplefilter("ignore")
    client = gradio_client.Client(url, verbose=False, analytics_enabled=False)
    merge_args = {"base": "", "method": "average", "params": {}, "components": list(ml.arch.GROUPS),
                  "fallback": "average", "heads": "auto", "limit": 8, "compare": False, "multitask": ""}

    # quota
    accepted = refused = 0
    started = time.perf_counter()
    for i in range(args.merges):
        try:
            client.predict(models=["minilm", "minilm"], out=f"m{i}", api_name="/merge", **merge_args)
            accepted += 1
        except gradio_client.exceptions.AppError as exc:
            assert "MB a session may keep" in str(exc), str(exc)
            refused += 1
    used = sum(p.stat().st_size for p in (home / "sessions").rglob("*") if p.is_file()) / 2**20
    quota = {"merges": args.merges, "accepted": accepted, "refused": refused, "quota_mb": args.quota_mb,
             "session_disk_mb": round(used, 1), "seconds": round(time.perf_counter() - started, 1)}
    print_table([quota], list(quota))

    # Stop
    process = psutil.Process()
    spent = cpu(process)
    me, other = gradio_client.Client(url, verbose=False, analytics_enabled=False), gradio_client.Client(url, verbose=False, analytics_enabled=False)
    os.environ.update({"MERGELAB_MAX_POINTS": "51", "MERGELAB_MAX_EXAMPLES": "100000"})  # a long curve
    long_job = me.submit("pico-a", "pico-b", ["sst2"], 51, "line", 100000, "", "", [], 10, api_name="/curve")
    while cpu(process) - spent < 3:  # the curve is well under way (set up, walking its points)
        time.sleep(0.1)
    waiting = other.submit("pico-a", ["sst2"], "dev", 8, api_name="/evaluate")  # queued behind the curve
    time.sleep(1.0)
    assert not long_job.done() and not waiting.done(), "the curve ended before Stop: make it longer"
    me.predict(api_name="/stop")
    stopped = time.perf_counter()
    while not long_job.done() and time.perf_counter() - stopped < 30:
        time.sleep(0.01)
    ended = time.perf_counter() - stopped  # the stopped curve's job has ended (with the Cancelled error)
    waiting.result(timeout=60)  # the request queued behind the stopped curve
    queue_moved = time.perf_counter() - stopped
    last, idle_after = cpu(process), None
    while idle_after is None and time.perf_counter() - stopped < 30:
        time.sleep(0.05)
        now = cpu(process)
        if now - last < 0.025:  # under half a core over 50 ms: nothing is computing any more
            idle_after = time.perf_counter() - stopped
        last = now
    stop = {"stopped_job_ended_s": round(ended, 2), "queued_request_done_s": round(queue_moved, 2),
            "cpu_idle_after_s": round(idle_after, 2) if idle_after is not None else None}
    print_table([stop], list(stop))

    # concurrency
    def visit(i: int) -> bool:
        c = gradio_client.Client(url, verbose=False, analytics_enabled=False)
        c.predict(models=["pico-a", "pico-b"], out=f"c{i}", api_name="/merge", **merge_args)
        c.predict(f"merges/c{i}", ["sst2"], "dev", 16, api_name="/evaluate")
        return True

    started = time.perf_counter()
    errors = 0
    with ThreadPoolExecutor(args.sessions) as pool:
        for future in [pool.submit(visit, i) for i in range(args.sessions)]:
            try:
                future.result()
            except Exception:  # noqa: BLE001 - counted, not raised
                errors += 1
    together = {"sessions": args.sessions, "errors": errors, "seconds": round(time.perf_counter() - started, 1)}
    print_table([together], list(together))
    demo.close()
    write_results("public_mode", {"quota": quota, "stop": stop, "concurrency": together})


if __name__ == "__main__":
    main()
