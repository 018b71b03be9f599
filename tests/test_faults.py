"""SIGKILL in the middle of a merge, a statistics computation and a curve: nothing half-written is
visible afterwards, the sweep at start removes what the killed process left, and a rerun gives the
same result as an undisturbed run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import merging_core as ml
from merging_core.outputs import STAGING, sweep

from .conftest import REPO

pytestmark = pytest.mark.integration  # end to end and slow: deselect with -m 'not integration'

# The child runs one job whose progress callback, half-way, writes a marker and hangs (until killed).
CHILD = textwrap.dedent('''
    import json, sys, time
    from pathlib import Path
    import merging_core as ml

    job, marker, args = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])

    def progress(fraction, desc):
        if fraction >= 0.5 and not marker.exists():
            marker.write_text(desc)
            time.sleep(600)

    if job == "merge":
        ml.merge("average", args["models"], out=args["out"], progress=progress)
    elif job == "stats":
        ml.stats.statistics(args["model"], "sst2", ("gram",), {"examples": 64}, progress=progress)
    elif job == "curve":
        for _ in ml.curve(args["a"], args["b"], "sst2", points=6, limit=16, progress=progress):
            pass
''')


def kill_half_way(job: str, args: dict, tmp_path: Path) -> None:
    marker = tmp_path / f"{job}.marker"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, job, str(marker), json.dumps(args)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert child.poll() is None, child.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the child never got half-way"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if STAGING in p.name]


def test_a_killed_merge_leaves_nothing_half_written(pico, tmp_path, isolated_home):
    models = [str(pico("sst2", 0)), str(pico("sst2", 1))]
    out = isolated_home / "merges" / "killed"
    kill_half_way("merge", {"models": models, "out": str(out)}, tmp_path)
    assert not (out / "model.safetensors").exists()  # at most the empty placeholder of the claimed name
    assert leftovers(isolated_home)  # the dead writer's staging folder, half-written
    removed = sweep(isolated_home)
    assert removed and not leftovers(isolated_home) and not out.exists()
    ml.merge("average", models, out=out)  # the name is free again; the rerun is complete
    reference = ml.merge("average", models).state
    merged = {k.removeprefix("bert."): v for k, v in load_file(out / "model.safetensors").items()}
    assert all(torch.equal(merged[k], reference[k]) for k in reference)


def test_a_killed_statistics_run_leaves_no_cache_entry(pico, tmp_path, isolated_home):
    model = str(pico("sst2", 0))
    kill_half_way("stats", {"model": model}, tmp_path)
    stats_dir = isolated_home / "cache" / "stats"
    assert not list(stats_dir.glob("*.safetensors")) if stats_dir.exists() else True
    sweep(isolated_home)
    assert not leftovers(isolated_home)
    again = ml.stats.statistics(model, "sst2", ("gram",), {"examples": 64})
    fresh = ml.stats.compute(ml.resolve(model), ml.get_task("sst2"), "gram", {**ml.stats.DEFAULTS, "examples": 64})
    assert all(torch.equal(again[k]["gram"], fresh[k]["gram"]) for k in fresh)


def test_a_killed_curve_writes_nothing_and_reruns_the_same(pico, tmp_path, isolated_home):
    a, b = str(pico("sst2", 0)), str(pico("sst2", 1))
    before = set(isolated_home.rglob("*")) if isolated_home.exists() else set()
    kill_half_way("curve", {"a": a, "b": b}, tmp_path)
    after = {p for p in isolated_home.rglob("*")} if isolated_home.exists() else set()
    assert not [p for p in after - before if p.suffix == ".safetensors" and "cache" not in p.parts]
    assert not leftovers(isolated_home)
    first = [p["scores"] for p in ml.curve(a, b, "sst2", points=6, limit=16)]
    second = [p["scores"] for p in ml.curve(a, b, "sst2", points=6, limit=16)]
    assert first == second


@pytest.mark.parametrize("alive", [True, False])
def test_the_sweep_spares_live_writers(alive, tmp_path):
    pid = os.getpid() if alive else 2**22 + 17  # beyond pid_max: never a live process
    staging = tmp_path / "merges" / f".m{STAGING}{pid}-abcd"
    staging.mkdir(parents=True)
    (tmp_path / "merges" / "m").mkdir()
    sweep(tmp_path)
    assert staging.exists() == alive and (tmp_path / "merges" / "m").exists() == alive
