"""The demo recipe, what each tab needs from the zoo, a published zoo downloaded from the hub's cache, and
the app's start on an empty zoo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import merging_core as ml
from merging_core import zoo

from .conftest import copy_model


def _entry(home: Path, name: str, **meta) -> Path:
    folder = home / "zoo" / name
    folder.mkdir(parents=True)
    (folder / "mergelab.json").write_text(json.dumps({"kind": "full", "base": "minilm", "seed": 0, "steps": 10,
                                                      **meta}))
    return folder


def test_demo_recipe_covers_every_tab():
    recipe = zoo.load_recipe("demo")
    assert recipe.minutes and recipe.about
    entries = recipe.entries
    assert len(entries) <= 10 and all(c.steps <= 200 and c.eval_limit for c in entries.values())
    sst2 = [c for c in entries.values() if c.task == "sst2" and not c.peft]
    assert len(sst2) == 2 and sst2[0].seed != sst2[1].seed  # same task, two seeds
    assert len({c.task for c in entries.values() if not c.peft and c.base == "minilm"}) >= 3  # different tasks
    scratch = [c for c in entries.values() if c.base.startswith("scratch:")]
    assert len({c.seed for c in scratch}) == 2  # different initializations
    assert len({c.task for c in entries.values() if c.peft == "lora"}) >= 3  # LoRA modules of three tasks


def test_readiness_follows_the_zoo(isolated_home):
    def ready() -> dict[str, bool]:
        return {r["tab"]: r["ready"] for r in zoo.readiness()}

    assert not any(ready().values())
    assert all(r["recipes"] and r["needs"] for r in zoo.readiness())
    _entry(isolated_home, "a", task="sst2", seed=0)
    assert ready() == {"Evaluate": True, "Merge": False, "Curves": False, "Permute": False, "Ensemble": False,
                       "Sweep": False}
    _entry(isolated_home, "b", task="sst2", seed=1)
    assert ready()["Merge"] and ready()["Sweep"] and ready()["Curves"] and not ready()["Permute"]
    _entry(isolated_home, "p0", task="corpus", base="scratch:tiny", seed=0)
    _entry(isolated_home, "p1", task="corpus", base="scratch:tiny", seed=1)
    assert ready()["Permute"]
    _entry(isolated_home, "l1", task="sst2", kind="lora")
    assert not ready()["Ensemble"]  # modules of one task only
    _entry(isolated_home, "l2", task="emotion", kind="lora")
    assert all(ready().values())


def test_recipe_build_reports_entries_and_time_left(isolated_home, pico, tmp_path):
    recipe = tmp_path / "three.yaml"
    recipe.write_text(f"about: three pico models\nminutes: 1\ndefaults: {{base: '{pico(None)}', steps: 5, "
                      "batch_size: 4, eval_limit: 8}\nmodels:\n  one: {task: sst2}\n  two: {task: sst2, seed: 1}\n"
                      "  three: {task: sst2, seed: 2}\n")
    seen: list[tuple[float, str]] = []
    rows = zoo.build(recipe, progress=lambda f, d: seen.append((f, d)))
    assert [r["status"] for r in rows] == ["built"] * 3
    texts = [d for _, d in seen]
    for i, name in enumerate(("one", "two", "three"), 1):
        assert any(d.startswith(f"[{i}/3] {name}: train sst2: step 5/5") for d in texts)
    # after the first entry, the time the rest of the recipe will take; none on the last entry
    assert any("then ~" in d for d in texts if d.startswith("[2/3]"))
    assert not any("then ~" in d for d in texts if d.startswith(("[1/3]", "[3/3]")))
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    meta = json.loads((isolated_home / "zoo" / "one" / "mergelab.json").read_text())
    assert meta["recipe"] == "three"
    assert {r["name"]: r["recipe"] for r in zoo.entries()} == {"one": "three", "two": "three", "three": "three"}
    assert zoo.load_recipe(recipe).missing() == []


def test_a_build_killed_midway_resumes(isolated_home, pico, tmp_path):
    """A killed build leaves its claimed (empty) entry folder and its staging folder behind; building the
    recipe again must build that entry, not stop at "already exists"."""
    recipe = tmp_path / "two.yaml"
    recipe.write_text(f"defaults: {{base: '{pico(None)}', steps: 3, batch_size: 4, eval_limit: 8}}\nmodels:\n"
                      "  one: {task: sst2}\n  two: {task: sst2, seed: 1}\n")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a process id that no longer runs: the killed build's
    zoo_root = isolated_home / "zoo"
    (zoo_root / "one").mkdir(parents=True)  # the claimed placeholder
    (zoo_root / f".one.staging-{gone.pid}-0badf00d").mkdir()  # its half-written staging folder
    (zoo_root / f".one.staging-{gone.pid}-0badf00d" / "model.safetensors").write_bytes(b"half")
    rows = zoo.build(recipe)
    assert [r["status"] for r in rows] == ["built", "built"]
    assert (zoo_root / "one" / "mergelab.json").is_file()
    assert sorted(p.name for p in zoo_root.iterdir()) == ["one", "two"]  # nothing left behind


def _hub_cache(root: Path, repo: str, entries: dict[str, Path]) -> Path:
    """A folder laid out like the hub's cache after a download of `repo`: blobs, a snapshot of links to
    them, and refs/main naming the snapshot."""
    base = root / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = base / "snapshots" / commit
    (base / "blobs").mkdir(parents=True)
    for name, src in entries.items():
        for file in sorted(p for p in src.rglob("*") if p.is_file()):
            blob = base / "blobs" / f"{name}-{file.name}"
            shutil.copy(file, blob)
            link = snapshot / name / file.relative_to(src)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)
    return root


def test_download_a_published_zoo_from_the_hub_cache(isolated_home, pico, tmp_path, monkeypatch):
    a = copy_model(pico("sst2", seed=0), tmp_path / "src" / "demo-a")
    (a / "mergelab.json").write_text(json.dumps({"task": "sst2", "kind": "full", "base": "minilm", "seed": 0}))
    b = copy_model(pico("sst2", seed=1), tmp_path / "src" / "demo-b")
    (b / "mergelab.json").write_text(json.dumps({"task": "sst2", "kind": "full", "base": "minilm", "seed": 1}))
    cache = _hub_cache(tmp_path / "hub", "someone/zoo", {"demo-a": a, "demo-b": b})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("MERGELAB_ZOO_REPO", "someone/zoo")
    kept = _entry(isolated_home, "demo-b", task="sst2", seed=7)  # already here: never replaced

    seen = []
    rows = zoo.download(progress=lambda f, d: seen.append(d))
    assert {r["name"]: r["status"] for r in rows} == {"demo-a": "downloaded", "demo-b": "kept"}
    copied = isolated_home / "zoo" / "demo-a"
    assert not any(p.is_symlink() for p in copied.rglob("*"))  # real files, not links into the cache
    assert sorted(p.name for p in copied.iterdir()) == sorted(p.name for p in a.iterdir())
    assert json.loads((kept / "mergelab.json").read_text())["seed"] == 7
    assert ml.evaluate(str(copied), "sst2", limit=4)["n"] == 4  # a working model
    assert any("someone/zoo" in d for d in seen)


def test_download_errors_name_the_repository(isolated_home, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.delenv("MERGELAB_ZOO_REPO", raising=False)
    with pytest.raises(ml.MergeLabError, match="MERGELAB_ZOO_REPO"):
        zoo.download()
    with pytest.raises(ml.MergeLabError, match="could not download the zoo 'someone/missing'"):
        zoo.download("someone/missing")


def test_public_app_provisions_an_empty_zoo_from_the_published_one(public_home, pico, tmp_path, monkeypatch):
    """A Space starts on an empty zoo: with a published zoo configured, the app fetches it by itself."""
    from views import start

    shutil.rmtree(public_home / "zoo")
    src = {}
    for name, task, seed in (("demo-a", "sst2", 0), ("demo-b", "sst2", 1)):
        src[name] = copy_model(pico(task, seed=seed), tmp_path / "src" / name)
        (src[name] / "mergelab.json").write_text(json.dumps({"task": task, "kind": "full", "base": "minilm",
                                                             "seed": seed}))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(_hub_cache(tmp_path / "hub", "someone/zoo", src)))
    monkeypatch.setenv("MERGELAB_ZOO_REPO", "someone/zoo")
    monkeypatch.setenv("MERGELAB_PROVISION", "demo")
    thread = start.provision_in_background()
    assert thread is not None
    thread.join(60)
    assert {r["name"] for r in zoo.entries()} == {"demo-a", "demo-b"}
    assert start.build_status() == ""  # nothing running, no error
    monkeypatch.setenv("MERGELAB_PROVISION", "off")
    assert start.provision_in_background() is None


def test_local_app_does_not_build_by_itself(isolated_home, monkeypatch):
    from views import start

    monkeypatch.delenv("MERGELAB_PROVISION", raising=False)
    assert ml.settings.provision() == "off"
    assert start.provision_in_background() is None
    assert "The demo zoo (9 small models" in start.readiness_text()
    assert "needs two models pretrained from different random initializations" in start.tab_notice("Permute")
    monkeypatch.setenv("MERGELAB_PROVISION", "sometimes")
    with pytest.raises(ml.MergeLabError, match="MERGELAB_PROVISION"):
        ml.settings.provision()


def test_cli_downloads_a_published_zoo(isolated_home, pico, tmp_path, monkeypatch, capsys):
    from merging_core.cli import main

    src = copy_model(pico("sst2", seed=0), tmp_path / "src" / "demo-a")
    (src / "mergelab.json").write_text(json.dumps({"task": "sst2", "kind": "full", "base": "minilm", "seed": 0}))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(_hub_cache(tmp_path / "hub", "someone/zoo", {"demo-a": src})))
    assert main(["zoo", "download", "--repo", "someone/zoo", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"name": "demo-a", "status": "downloaded",
                                                     "seconds": pytest.approx(0.0, abs=30)}]
    assert main(["zoo", "download", "--repo", "someone/other"]) == 2
    assert "--repo: could not download the zoo 'someone/other'" in capsys.readouterr().err
