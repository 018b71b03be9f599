"""Sweeps on Ray Tune: the space grammar and its errors, per-block λ in the engine, a grid whose every trial
equals a sequential merge + evaluate, a killed sweep resumed, a two-node cluster, per-layer CMA-ES, the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import merging_core as ml
from merging_core.compare import Inputs, Scorer
from merging_core.errors import MergeLabError
from merging_core.methods import get_method
from merging_core.sweep import SweepSpec, materialize, open_sweep, parse_dimension, sweep
from merging_core.sweep.runner import connect
from merging_core.sweep.trial import Job, score_point

from .conftest import REPO, copy_model

TIES = get_method("ties")
DEV = 48  # dev examples each trial is scored on


@pytest.fixture()
def sweep_zoo(isolated_home, pico):
    """A zoo of two pico SST-2 models (different seeds) and their bare base."""
    zoo = isolated_home / "zoo"
    for name, seed in (("sst2-a", 0), ("sst2-b", 1)):
        entry = copy_model(pico("sst2", seed), zoo / name)
        (entry / "mergelab.json").write_text(json.dumps({"task": "sst2", "kind": "full", "seed": seed, "steps": 0}))
    copy_model(pico(None, 0), zoo / "base")
    (zoo / "base" / "mergelab.json").write_text(json.dumps({"kind": "base"}))
    return isolated_home


@pytest.fixture(scope="module")
def local_ray():
    """Ray started once for this module's sweeps, with 2 CPUs, and shut down after them."""
    import ray

    yield
    ray.shutdown()


# ----------------------------------------------------------------------------------------------------
# the space


def test_dimensions_from_the_method_spec():
    assert parse_dimension("density=0.1:0.9:5", TIES, ()).values == (0.1, 0.3, 0.5, 0.7, 0.9)
    whole = parse_dimension("density", TIES, ())
    assert (whole.low, whole.high, whole.values) == (0.0, 1.0, ())  # the spec's bounds
    assert parse_dimension("lambda=0.5,1,1.5", TIES, ()).values == (0.5, 1.0, 1.5)
    assert parse_dimension("scope", TIES, ()).values == ("model", "tensor")
    assert parse_dimension("components=attention+feed_forward,all", TIES, ()).values == ("attention+feed_forward", "all")
    assert parse_dimension("models=a+b,a+b+c", TIES, ("a", "b", "c")).values == ("a+b", "a+b+c")
    assert parse_dimension("iterations=0:100:3", get_method("mats"), ()).values == (0, 50, 100)


@pytest.mark.parametrize("text, message", [
    ("density=0.9:0.1", "empty or inverted"),
    ("density=0.5:0.5:3", "empty or inverted"),
    ("density=0:1:1", "at least 2 points"),
    ("density=0:2", "must be in [0.0, 1.0]"),
    ("temperature=0:1", "has no parameter 'temperature'"),
    ("density=0.5", "gives one value"),
    ("scope=model,model", "twice"),
    ("components=attention+brain", "unknown component 'brain'"),
    ("models=a+z", "not one of the sweep's models"),
])
def test_bad_dimensions_are_one_line_errors(text, message):
    with pytest.raises(MergeLabError) as caught:
        parse_dimension(text, TIES, ("a", "b"))
    assert message in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(MergeLabError, match="one value per model"):
        parse_dimension("weights=1,2", get_method("average"), ())


@pytest.mark.parametrize("fields, message", [
    ({"space": ("lambda=0:1",)}, "a grid needs points"),
    ({"space": ("scope",), "algorithm": "cmaes"}, "CMA-ES searches continuous ranges"),
    ({"space": ("lambda=0:1:3",), "params": {"lambda": 0.5}}, "both fixed and varied"),
    ({"space": ()}, "nothing varies"),
    ({"space": ("lambda=0:1:3",), "algorithm": "annealing"}, "unknown search algorithm"),
    ({"space": ("lambda=0:1:3", "lambda=0:2:3")}, "varied twice"),
    ({"space": (), "per_layer": True}, "search it with cmaes"),
    ({"space": ("lambda=0:1:3",), "trials": 5}, "the grid has 3 points"),
    ({"space": ("lambda=0:1:3",), "dev_size": 0}, "dev_size must be at least 1"),
])
def test_bad_sweeps_are_one_line_errors(fields, message):
    with pytest.raises(MergeLabError) as caught:
        SweepSpec("ties", ("a", "b"), base="c", **fields)
    assert message in str(caught.value)
    with pytest.raises(MergeLabError, match="has no lambda to set per layer"):
        SweepSpec("average", ("a", "b"), per_layer=True, algorithm="cmaes")


def test_public_mode_bounds_the_trials(public_home):
    with pytest.raises(MergeLabError, match=r"36 trials is more than this app allows \(25\)"):
        SweepSpec("ties", ("pico-sst2", "pico-cola"), base="pico-sst2", space=("lambda=0:1:6", "density=0:1:6"))
    with pytest.raises(MergeLabError, match="more than this app allows"):
        SweepSpec("ties", ("pico-sst2", "pico-cola"), base="pico-sst2", space=("lambda=0:1:3",), dev_size=400,
                  holdout_size=200)


def test_an_unreachable_cluster_is_one_line():
    started = time.perf_counter()
    with pytest.raises(MergeLabError, match="no Ray cluster answers at 127.0.0.1:1") as caught:
        connect("127.0.0.1:1")
    assert caught.value.param == "address" and time.perf_counter() - started < 10
    with pytest.raises(MergeLabError, match="is not host:port"):
        connect("nowhere")


def test_component_and_model_dimensions_are_merges(sweep_zoo, pico):
    """A point's components and model subset become the merge's own: a trial scores exactly that merge."""
    entry = copy_model(pico("sst2", 7), sweep_zoo / "zoo" / "sst2-c")
    (entry / "mergelab.json").write_text(json.dumps({"task": "sst2", "kind": "full", "seed": 7, "steps": 0}))
    spec = SweepSpec("task_arithmetic", ("sst2-a", "sst2-b", "sst2-c"), base="base",
                     space=("components=attention+feed_forward,all", "models=sst2-a+sst2-b,sst2-a+sst2-b+sst2-c"),
                     dev_size=DEV)
    point = {"components": "attention+feed_forward", "models": "sst2-a+sst2-c", "lambda": 0.7}
    merge_spec = spec.merge_spec(point)
    assert merge_spec.components == ("attention", "feed_forward") and merge_spec.models == ("sst2-a", "sst2-c")
    assert merge_spec.params["lambda"] == 0.7
    scored = score_point(Job(spec, ("sst2",), "", "test", {}), point)
    merged = ml.merge(merge_spec)
    expected = Scorer(Inputs.open(["sst2-a", "sst2-c"]), DEV).merged(merged, "sst2")
    assert scored["sst2"] == expected["accuracy"] and scored["sst2:loss"] == pytest.approx(expected["loss"], rel=1e-6)
    assert spec.trial_count() == 4


# ----------------------------------------------------------------------------------------------------
# per-block λ in the engine


def test_layer_lambdas_set_each_blocks_lambda(sweep_zoo, tmp_path):
    models, base = ["sst2-a", "sst2-b"], "base"
    plain = ml.merge("task_arithmetic", models, base=base, params={"lambda": 0.4})
    same = ml.merge("task_arithmetic", models, base=base, params={"lambda": 0.4}, layer_lambdas=(0.4, 0.4))
    assert all(torch.equal(plain.state[k], same.state[k]) for k in plain.state)
    out = ml.merge("task_arithmetic", models, base=base, params={"lambda": 0.4}, layer_lambdas=(0.0, 1.5),
                   out=tmp_path / "layered")
    merged = {ml.arch.canonical(k): v for k, v in load_file(out.out / "model.safetensors").items()}
    inputs = [load_file(sweep_zoo / "zoo" / m / "model.safetensors") for m in models]
    bare = load_file(sweep_zoo / "zoo" / base / "model.safetensors")
    checked = set()
    for name, value in merged.items():
        full = f"bert.{name}" if f"bert.{name}" in inputs[0] else name
        if full not in inputs[0] or name not in bare or not value.is_floating_point():
            continue
        lam = 0.0 if ".layer.0." in name else 1.5 if ".layer.1." in name else 0.4
        expected = bare[name] + lam * sum(m[full] - bare[name] for m in inputs)  # Ilharco et al., Eq. 1, per block
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-6)
        checked.add(lam)
    assert checked == {0.0, 1.5, 0.4}
    config = json.loads((out.out / "merge_config.json").read_text())
    assert config["layer_lambdas"] == [0.0, 1.5] and config["mergekit"].startswith("not expressible")
    again = ml.merge_from_config(out.out)
    assert all(torch.equal(again.state[k], merged[k]) for k in again.state if k in merged)
    with pytest.raises(MergeLabError, match="layer_lambdas has 3 values, but 'sst2-a' has 2 transformer blocks"):
        ml.merge("ties", models, base=base, layer_lambdas=(1.0, 1.0, 1.0))
    with pytest.raises(MergeLabError, match="method 'average' has no lambda"):
        ml.MergeSpec("average", tuple(models), layer_lambdas=(1.0, 1.0))
    with pytest.raises(MergeLabError, match=r"must be in \[0.0, 3.0\]"):
        ml.MergeSpec("ties", tuple(models), base=base, layer_lambdas=(1.0, 9.0))


# ----------------------------------------------------------------------------------------------------
# sweeps on Ray


@pytest.mark.integration
def test_ray_outlives_the_thread_that_started_it(local_ray):
    """The app starts Ray from a request's thread; Ray's processes die with the thread that spawned them
    (Linux's parent-death signal), so MergeLab spawns them from one thread that lives on."""
    import ray

    ray.shutdown()
    starter = threading.Thread(target=connect)
    starter.start()
    starter.join()
    time.sleep(3)  # a killed GCS would be gone by now
    assert ray.get(ray.put(41), timeout=30) == 41 and all(n["Alive"] for n in ray.nodes())


@pytest.mark.integration
def test_a_ties_grid_equals_sequential_merges(sweep_zoo, local_ray, tmp_path, monkeypatch):
    """Every trial of a 5x5 TIES grid (λ x density) scores what `merge` + `evaluate` of its settings score;
    with a relative data root, as CI sets it (the workers run elsewhere)."""
    monkeypatch.setenv("MERGELAB_DATA", os.path.relpath(os.environ["MERGELAB_DATA"]))
    spec = SweepSpec("ties", ("sst2-a", "sst2-b"), base="base", space=("lambda=0.2:1.8:5", "density=0.1:0.9:5"),
                     dev_size=DEV, workers=2)
    fractions = []
    run = sweep(spec, progress=lambda f, d: fractions.append(f))
    rows = list(run)
    assert len(rows) == 25 and len({(r["lambda"], r["density"]) for r in rows}) == 25
    assert fractions[-1] == 1.0 and fractions == sorted(fractions)
    for row in rows:
        out = ml.merge("ties", ["sst2-a", "sst2-b"], base="base", out=tmp_path / row["trial"],
                       params={"lambda": row["lambda"], "density": row["density"]})
        expected = ml.evaluate(str(out.out), "sst2", limit=DEV)
        assert row["sst2"] == expected["accuracy"] == row["objective"]
        assert row["sst2:loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert len({round(r["sst2:loss"], 6) for r in rows}) > 5  # the settings matter: a real comparison
    table = (run.folder / "trials.csv").read_text().splitlines()
    assert len(table) == 26 and "lambda" in table[0] and "sst2" in table[0]
    best = max(rows, key=lambda r: r["objective"])
    assert run.summary()["best"]["objective"] == best["objective"]
    again = sweep(spec)  # the same sweep again: nothing left to run, the same rows
    assert sorted(r["trial"] for r in again) == sorted(r["trial"] for r in rows)


@pytest.mark.integration
def test_per_layer_cmaes_materializes_as_a_merge(sweep_zoo, local_ray, tmp_path):
    spec = SweepSpec("task_arithmetic", ("sst2-a", "sst2-b"), base="base", space=("lambda=0:1",), per_layer=True,
                     algorithm="cmaes", trials=4, dev_size=DEV, holdout_size=32, seed=3)
    run = sweep(spec)
    summary = run.run()
    rows = run.rows()
    assert len(rows) == 4 and all(0 <= r["lambda@0"] <= 1 and 0 <= r["lambda@1"] <= 1 for r in rows)
    assert summary["holdout"]["examples"] == 32 and 0 <= summary["holdout"]["sst2"] <= 1
    best = summary["best"]
    out = materialize(run.folder, tmp_path / "best")
    config = json.loads((out.out / "merge_config.json").read_text())
    assert config["layer_lambdas"] == [best["lambda@0"], best["lambda@1"]]
    assert ml.evaluate(str(out.out), "sst2", limit=DEV)["accuracy"] == best["sst2"]
    with pytest.raises(MergeLabError, match="sweep exists with other settings|exists with other settings"):
        sweep(SweepSpec("task_arithmetic", ("sst2-a", "sst2-b"), base="base", space=("lambda=0:2",), per_layer=True,
                        algorithm="cmaes", trials=4), folder=run.folder).run()


@pytest.mark.integration
@pytest.mark.parametrize("algorithm", ["random", "tpe"])
def test_sampled_searches_stay_in_their_ranges(sweep_zoo, local_ray, algorithm):
    spec = SweepSpec("ties", ("sst2-a", "sst2-b"), base="base", space=("lambda=0.2:1.8", "scope=model,tensor"),
                     algorithm=algorithm, trials=4, dev_size=DEV, seed=1)
    run = sweep(spec)
    run.run()
    rows = run.rows()
    assert len(rows) == 4 and len({(r["lambda"], r["scope"]) for r in rows}) == 4
    assert all(0.2 <= r["lambda"] <= 1.8 and r["scope"] in ("model", "tensor") and 0 <= r["sst2"] <= 1 for r in rows)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "merging_core", *args]


def _rows(folder: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (folder / "rows").glob("*.json")}


def _kill_after(command: list[str], env: dict, folder: Path, rows: int) -> dict[str, dict]:
    """Run `command` until `folder` holds `rows` rows, then SIGKILL it and all it started; the rows."""
    run = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while len(_rows(folder)) < rows and time.monotonic() < deadline and run.poll() is None:
            time.sleep(0.02)
        os.killpg(run.pid, signal.SIGKILL)  # the driver and whatever it started: no goodbye
    finally:
        run.wait()
    return _rows(folder)


@pytest.mark.integration
def test_a_killed_sweep_resumes_without_rerunning_finished_trials(sweep_zoo):
    """Killed twice: resumed once by Ray Tune's restore, once from a state file the kill left empty (Ray Tune
    writes it in place); finished trials are never run again and the table ends complete."""
    command = _cli("sweep", "run", "--method", "ties", "--models", "sst2-a", "sst2-b", "--base", "base", "--vary",
                   "lambda=0.2:1.8:4", "density=0.1:0.9:4", "--dev-size", str(DEV), "--workers", "1",
                   "--name", "killed", "--json")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    folder = sweep_zoo / "sweeps" / "killed"
    first = _kill_after(command, env, folder, 3)
    assert 3 <= len(first) < 16, "the sweep was not killed midway"
    second = _kill_after(command, env, folder, len(first) + 3)
    assert len(first) + 3 <= len(second) < 16, "the resumed sweep was not killed midway"
    assert all(second[trial] == row for trial, row in first.items())
    for state in folder.glob("experiment_state-*.json"):
        state.write_text("")  # what a kill during Ray Tune's write of its state leaves
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]
    after = _rows(folder)
    assert len(after) == 16 and len({json.dumps(r["point"], sort_keys=True) for r in after.values()}) == 16
    assert all(after[trial] == row for trial, row in second.items())  # finished before a kill: not run again
    runs = [{row["reported"]["mergelab"]["run"] for row in rows.values()} for rows in (first, second, after)]
    assert len(runs[0]) == 1 and len(runs[1]) == 2 and len(runs[2]) == 3  # each run added trials of its own
    lines = (folder / "trials.csv").read_text().splitlines()
    assert len(lines) == 17
    printed = [json.loads(line) for line in finished.stdout.splitlines()]
    assert printed[-1]["finished"] == 16 and len(printed) == 17  # every row, then the summary


def test_cli_errors_are_one_line(sweep_zoo):
    bad = subprocess.run(_cli("sweep", "run", "--method", "ties", "--models", "sst2-a", "sst2-b", "--base", "base",
                              "--vary", "density=0.9:0.1:3"), capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert bad.stderr.startswith("error: --vary: 'density=0.9:0.1:3': the range [0.9, 0.1] is empty")
    far = subprocess.run(_cli("sweep", "run", "--method", "ties", "--models", "sst2-a", "sst2-b", "--base", "base",
                              "--vary", "density=0.1:0.9:3", "--address", "127.0.0.1:1"), capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert far.returncode == 2 and far.stderr.startswith("error: --address: no Ray cluster answers at 127.0.0.1:1")


@pytest.mark.integration
def test_a_two_node_cluster_runs_trials_on_both(sweep_zoo, monkeypatch):
    """`ray start --head` plus a second node with its own resources, on this machine; the sweep attaches
    through RAY_ADDRESS and its trials land on both nodes."""
    import ray

    ray.shutdown()
    port = "6391"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}
    ray_cli = [sys.executable, "-m", "ray.scripts.scripts"]
    subprocess.run(ray_cli + ["get-auth-token", "--generate"], env=env, capture_output=True, check=True)
    try:
        subprocess.run(ray_cli + ["start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
                                  "--resources", '{"head": 1}'], env=env, capture_output=True, check=True, timeout=120)
        subprocess.run(ray_cli + ["start", f"--address=127.0.0.1:{port}", "--num-cpus=1", "--resources",
                                  '{"second": 1}'], env=env, capture_output=True, check=True, timeout=120)
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
        monkeypatch.setenv("RAY_AUTH_MODE", "token")
        spec = SweepSpec("ties", ("sst2-a", "sst2-b"), base="base", space=("lambda=0.5:1.5:3", "density=0.2:0.8:2"),
                         dev_size=DEV)
        run = sweep(spec)
        run.run()
        rows = open_sweep(spec.key()).rows()  # (by name, as `sweep show` finds it)
        assert len(rows) == 6
        nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert len(nodes) == 2 and {r["node"] for r in rows} == nodes  # trials ran on both nodes
    finally:
        ray.shutdown()
        subprocess.run(ray_cli + ["stop", "--force"], env=env, capture_output=True, timeout=120)
