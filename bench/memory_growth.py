"""The app's resident memory over a user's actions and after they stop, measured from outside.

Starts `python app.py` in a subprocess on a fresh home whose zoo holds MiniLM-sized checkpoints
(`--size minilm`: the packaged MiniLM with fresh sst2 / cola / MLM heads, a permuted copy of the MLM
one, two LoRA modules) or pico ones (`--size pico`), drives it through gradio_client with a mix of
evaluate, merge, curve, align and ensemble calls at the UI's default sizes, and reads the server's
VmRSS / VmHWM from /proc/<pid>/status after startup, after each action and while it idles.

    MERGELAB_DATA=../shared/data MERGELAB_CACHE_IDLE_S=10 python bench/memory_growth.py --actions 8 --idle 20 --pause 4
    MERGELAB_DATA=../shared/data python bench/memory_growth.py --no-janitor  # the control: the app as before

Extra environment (MERGELAB_CACHE_MB, MERGELAB_CACHE_IDLE_S, MALLOC_ARENA_MAX, ...) is passed on to the app.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from common import write_results

REPO = Path(__file__).resolve().parent.parent


def status_kb(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (peak RSS) and RssAnon of a process, in kB, from /proc/<pid>/status."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            found[key] = int(value.split()[0])
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_zoo(zoo: Path, size: str) -> None:
    """Checkpoints for every action."""
    import torch

    import merging_core as ml
    from merging_core.align import permute_checkpoint

    def entry(name: str, task: str, seed: int) -> None:
        if size == "pico":
            sys.path.insert(0, str(REPO))
            from tests.conftest import make_pico

            make_pico(zoo / name, task, seed)
        else:
            torch.manual_seed(seed)
            loaded = ml.models.load("minilm", ml.get_task(task), new_head=True, device="cpu")
            loaded.model.save_pretrained(zoo / name)
            loaded.tokenizer.save_pretrained(zoo / name)
        (zoo / name / "mergelab.json").write_text(json.dumps({"task": task, "kind": "full", "seed": seed,
                                                              "steps": 0, "base": "minilm"}))

    entry("m-sst2-a", "sst2", 0)
    entry("m-sst2-b", "sst2", 1)
    entry("m-cola", "cola", 2)
    entry("m-mlm", "wikitext2", 3)
    permute_checkpoint("m-mlm", zoo / "m-mlm-perm", seed=2)
    base = "minilm" if size == "minilm" else str(zoo / "m-bare")
    if size == "pico":
        from tests.conftest import make_pico

        make_pico(zoo / "m-bare", None, 0)
    for task in ("cola", "emotion"):
        ml.train(ml.TrainConfig(task=task, base=base, steps=2, batch_size=4, peft="lora", eval_limit=8),
                 zoo / f"lora-{task}")


def actions(client, groups: list[str], base: str) -> list[tuple[str, callable]]:
    """The mixed actions, in order (UI default sizes: limit 200, 26 curve points, align 128/11/64)."""
    merge = {"base": "", "params": {}, "components": groups, "fallback": "average", "heads": "auto",
             "limit": 200, "compare": True, "multitask": "", "out": ""}
    return [
        ("evaluate", lambda: client.predict("m-sst2-a", ["sst2"], "dev", 200, api_name="/evaluate")),
        ("merge", lambda: client.predict(models=["m-sst2-a", "m-sst2-b"], method="average", **merge,
                                         api_name="/merge")),
        ("curve", lambda: client.predict("m-sst2-a", "m-sst2-b", ["sst2"], 26, "line", 200, "", "", [], 10,
                                         api_name="/curve")),
        ("align", lambda: client.predict("m-mlm", "m-mlm-perm", "all", "head-perm", "first", True, "wikitext2", 128,
                                         [], 11, 64, api_name="/align")),
        ("ensemble", lambda: client.predict("sst2", "lora", [], "loss", -1.0, "model", 8, "0,1", 5, 32,
                                            api_name="/ensemble")),
        ("evaluate", lambda: client.predict("m-cola", ["cola", "sst2", "emotion"], "dev", 200, api_name="/evaluate")),
        ("merge", lambda: client.predict(models=["m-sst2-a", "m-cola"], method="ties",
                                         **{**merge, "base": base}, api_name="/merge")),
        ("curve", lambda: client.predict("m-sst2-b", "m-cola", ["sst2", "cola"], 26, "line", 200, "", "", [], 10,
                                         api_name="/curve")),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("minilm", "pico"), default="minilm")
    parser.add_argument("--actions", type=int, default=8)
    parser.add_argument("--idle", type=float, default=60.0, help="seconds to watch the idle app afterwards")
    parser.add_argument("--name", default="memory_growth")
    parser.add_argument("--pause", type=float, default=0.0, help="seconds to wait after each action before reading")
    parser.add_argument("--no-janitor", action="store_true",
                        help="the app without its janitor and arena limit (as before them): the control")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="mergelab-mem-bench-"))
    os.environ.update({"MERGELAB_HOME": str(home), "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
                       "MERGELAB_DEVICE": "cpu", "TOKENIZERS_PARALLELISM": "false"})
    sys.path.insert(0, str(REPO))
    started = time.perf_counter()
    build_zoo(home / "zoo", args.size)
    print(f"zoo built in {time.perf_counter() - started:.0f} s")

    port = free_port()
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_SERVER_NAME": "127.0.0.1"}
    command = [sys.executable, "app.py"]
    if args.no_janitor:
        command = [sys.executable, "-c", "import runpy, merging_core.caches as c; c.start_janitor = c.limit_arenas "
                   "= lambda *a: None; runpy.run_path('app.py', run_name='__main__')"]
    app = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        import gradio_client

        warnings.simplefilter("ignore")
        deadline = time.monotonic() + 120
        while True:
            try:
                client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False, analytics_enabled=False)
                break
            except Exception:  # noqa: BLE001 - not listening yet
                if app.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"app did not start: {app.stderr.read().decode()[-2000:]}")
                time.sleep(0.5)
        time.sleep(1.0)
        rows = [{"step": "startup", "t": 0.0, **status_kb(app.pid)}]
        print(rows[-1])
        import merging_core as ml

        base = "minilm" if args.size == "minilm" else str(home / "zoo" / "m-bare")
        plan = actions(client, list(ml.arch.GROUPS), base)
        t0 = time.perf_counter()
        for i in range(args.actions):
            name, call = plan[i % len(plan)]
            begun = time.perf_counter()
            call()
            took = time.perf_counter() - begun
            time.sleep(args.pause)
            rows.append({"step": f"{i + 1}:{name}", "t": round(time.perf_counter() - t0, 1),
                         "seconds": round(took, 1), **status_kb(app.pid)})
            print(rows[-1])
        idle_start = time.perf_counter()
        while time.perf_counter() - idle_start < args.idle:
            time.sleep(min(5.0, args.idle))
            rows.append({"step": "idle", "t": round(time.perf_counter() - t0, 1), **status_kb(app.pid)})
            print(rows[-1])
    finally:
        app.terminate()
        app.wait(timeout=30)
        shutil.rmtree(home, ignore_errors=True)  # its zoo and merges: hundreds of MB
    mb = {k: round(v / 1024) for k, v in rows[-1].items() if k.startswith(("Vm", "Rss"))}
    print(f"startup {rows[0]['VmRSS'] / 1024:.0f} MB -> after actions and idle {mb['VmRSS']} MB; peak {mb['VmHWM']} MB")
    env_keys = sorted(k for k in os.environ if k.startswith(("MERGELAB_CACHE", "MALLOC_")))
    write_results(args.name, {"size": args.size, "actions": args.actions, "idle_s": args.idle,
                              "pause_s": args.pause, "janitor": not args.no_janitor,
                              "settings": {k: os.environ[k] for k in env_keys}, "rows": rows})


if __name__ == "__main__":
    main()
