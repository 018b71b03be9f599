"""The connectivity experiments of Qin et al. 2022 (arXiv:2210.14102, Sec. 4): fine-tunes that start from
intermediate pretraining checkpoints (a recipe's base naming `entry/step-N`), the pairs the zoo finds among
them, and the shipped recipes (pretrain-steps, split-data, adapters) checked against what they claim."""

from __future__ import annotations

import json
import re

import pytest
import torch

import merging_core as ml
from merging_core import models, partition, zoo
from merging_core.tasks import get_task


@pytest.fixture()
def zoo_home(isolated_home, mergelab_home):
    """An empty zoo sharing the session's tokenization cache (no SST-2 re-tokenization per test)."""
    isolated_home.mkdir(parents=True)
    (isolated_home / "cache").symlink_to(mergelab_home / "cache", target_is_directory=True)
    (mergelab_home / "cache").mkdir(exist_ok=True)
    return isolated_home


def test_fine_tunes_from_intermediate_checkpoints_build_resolve_and_pair(zoo_home, pico, tmp_path):
    recipe = tmp_path / "steps.yaml"
    recipe.write_text(f"defaults: {{task: sst2, steps: 2, batch_size: 4, eval_limit: 8}}\n"
                      f"models:\n  run: {{base: '{pico(None)}', steps: 4, save_every: 2, lr: 0.01}}\n"
                      "  early-s0: {base: run/step-2, seed: 0}\n  early-s1: {base: run/step-2, seed: 1}\n"
                      "  late-s0: {base: run, seed: 0}\n")
    rows = zoo.build(str(recipe))
    assert [r["status"] for r in rows] == ["built"] * 4
    built = {r["name"]: r for r in zoo.entries()}
    assert "run/step-2" in built and built["early-s0"]["base"] == "run/step-2"
    meta = json.loads((zoo_home / "zoo" / "early-s0" / "mergelab.json").read_text())
    assert meta["base_location"] == str(zoo_home / "zoo" / "run" / "step-2")
    # the fine-tune started from the step-2 weights: two small steps (lr 1e-4) from them, while the run's last
    # two steps (lr 1e-2) took the final checkpoint far away
    def query(name: str) -> torch.Tensor:
        return models.load(name, get_task("sst2"), device="cpu").model.bert.encoder.layer[0].attention.self.query.weight

    early, step2, final = query("early-s0"), query("run/step-2"), query("run")
    assert (early - step2).norm() < 0.2 * (early - final).norm()
    kinds = {(p["a"], p["b"]): p["kind"] for p in zoo.pairs()}
    assert kinds[("early-s0", "early-s1")] == "same task, different seeds"
    assert kinds[("early-s0", "late-s0")] == "different pretraining steps"
    assert kinds[("early-s1", "late-s0")] == "different pretraining steps"
    with pytest.raises(ml.MergeLabError, match=r"'run' has no checkpoint at step 3; it has steps 2$") as error:
        models.resolve("run/step-3")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name", ["pretrain-steps", "split-data", "adapters"])
def test_shipped_connectivity_recipes_are_consistent(name):
    recipe = zoo.load_recipe(name)
    order = list(recipe.entries)
    for entry, config in recipe.entries.items():
        found = re.fullmatch(r"(.+)/step-(\d+)", config.base)
        source = found.group(1) if found else config.base
        if source in recipe.entries:  # a base built by this recipe: listed before, and saved at that step
            assert order.index(source) < order.index(entry)
            if found:
                step, run = int(found.group(2)), recipe.entries[source]
                assert run.save_every and step % run.save_every == 0 and step < run.steps
        if config.peft:
            assert config.peft in ml.training.MODULE_KINDS


def test_split_data_halves_are_disjoint_and_cover_the_training_set():
    spec = get_task("sst2")
    labels = torch.from_numpy((torch.rand(2000, generator=torch.Generator().manual_seed(0)) < 0.55).long().numpy())
    halves = [partition.indices(partition.parse(c.partition), spec, labels)
              for c in zoo.load_recipe("split-data").entries.values()]
    assert len(halves) == 2
    assert not set(halves[0].tolist()) & set(halves[1].tolist())
    assert sorted(halves[0].tolist() + halves[1].tolist()) == list(range(len(labels)))
    assert abs(len(halves[0]) - len(halves[1])) <= 1
