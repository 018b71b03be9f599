"""Similarity-weighted ensembling of adapter modules, on pico LoRA / (IA)³ modules."""

from __future__ import annotations

import importlib
import json
import math

import pytest
import torch

import merging_core as ml
from merging_core.checkpoint import open_checkpoint
from merging_core.ensemble import (MEASURES, Measure, combine, deltas, get_measure, layer_weights, read_module,
                                   register_measure, similarity_matrix, softmax_weights, write_module)
from merging_core.ensemble.fewshot import draw_shots
from merging_core.ensemble.similarity import NEEDS, WEIGHTS, measure

TASKS = ("sst2", "cola", "emotion")


@pytest.fixture(scope="module")
def modules(pico, tmp_path_factory):
    """A pico base and LoRA / (IA)³ modules trained briefly on three tasks."""
    root = tmp_path_factory.mktemp("modules")
    base = str(pico(None))
    out = {}
    for kind in ("lora", "ia3"):
        for seed, task in enumerate(TASKS):
            config = ml.TrainConfig(task=task, base=base, steps=4, batch_size=8, peft=kind, eval_limit=8, seed=seed,
                                    lr=1e-2)
            out[(kind, task)] = str(ml.train(config, root / f"{kind}-{task}").out)
    return out


def test_temperature_limits_and_normalisation():
    scores = {"a": -0.5, "b": -1.0, "c": -2.0}
    for t in (1e-3, 0.1, 1.0, 100.0):
        w = softmax_weights(scores, t)
        assert sum(w.values()) == pytest.approx(1.0) and w["a"] > w["b"] > w["c"]
    assert softmax_weights(scores, 0.0) == {"a": 1.0, "b": 0.0, "c": 0.0}  # T -> 0: the most similar source
    assert softmax_weights(scores, 1e-4)["a"] == pytest.approx(1.0)
    assert list(softmax_weights(scores, math.inf).values()) == pytest.approx([1 / 3] * 3)  # T -> inf: uniform
    assert softmax_weights(scores, 1e6)["c"] == pytest.approx(1 / 3, abs=1e-6)
    assert softmax_weights({"a": 1.0, "b": 1.0}, 0.0) == {"a": 0.5, "b": 0.5}  # a tie shares
    with pytest.raises(ml.MergeLabError, match="temperature must be at least 0"):
        softmax_weights(scores, -1.0)


@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_one_module_with_weight_one_comes_back_exactly(modules, kind, tmp_path):
    module = read_module(modules[(kind, "sst2")])
    combined = combine([module], [1.0])
    assert set(combined) == set(module.body)
    assert all(torch.equal(combined[k], module.tensors[k]) for k in module.body)
    written = read_module(write_module(module, combined, tmp_path / "again", task="sst2", metadata={}))
    assert all(torch.equal(written.tensors[k], module.tensors[k]) for k in module.body)
    for layer, delta in combine([module], [1.0], space="weights").items():
        assert torch.equal(delta, deltas(module)[layer])


@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_deltas_are_the_folded_update(modules, kind):
    """ΔW from the module's own tensors equals the folded model minus its base (checks the (IA)³ formula)."""
    module = read_module(modules[(kind, "sst2")])
    folded, base = open_checkpoint(module.ref), open_checkpoint(ml.models.adapter_base(module.ref))
    for layer, delta in deltas(module).items():
        torch.testing.assert_close(folded.get(layer) - base.get(layer), delta, atol=1e-6, rtol=1e-5)


def test_module_space_and_weight_space_are_not_confused(modules):
    a, b = (read_module(modules[("lora", t)]) for t in ("sst2", "cola"))
    in_module = combine([a, b], [0.5, 0.5])
    in_weights = combine([a, b], [0.5, 0.5], space="weights")
    assert all(".lora_" in k for k in in_module) and all(k.endswith(".weight") and "lora" not in k for k in in_weights)
    for layer, delta in in_weights.items():
        torch.testing.assert_close(delta, (deltas(a)[layer] + deltas(b)[layer]) / 2)  # exact average of updates
    averaged = read_module(modules[("lora", "sst2")])
    averaged.tensors = {**averaged.tensors, **in_module}
    layer = next(iter(in_weights))
    assert not torch.allclose(deltas(averaged)[layer], in_weights[layer], atol=1e-7)  # B̄Ā is not the mean ΔW


def test_weight_space_is_merge_average_of_folded_modules(modules):
    specs = [modules[("lora", t)] for t in ("sst2", "cola")]
    result = ml.merge("average", specs, params={"weights": [0.7, 0.3]})
    base = ml.merge("average", [ml.models.adapter_base(ml.resolve(specs[0])).location])
    for layer, delta in combine([read_module(s) for s in specs], [0.7, 0.3], space="weights").items():
        torch.testing.assert_close(result.state[layer] - base.state[layer], delta, atol=1e-6, rtol=1e-5)


def test_combining_checks_its_inputs(modules):
    lora, ia3 = read_module(modules[("lora", "sst2")]), read_module(modules[("ia3", "cola")])
    with pytest.raises(ml.MergeLabError, match="different kinds"):
        combine([lora, ia3], [0.5, 0.5])
    with pytest.raises(ml.MergeLabError, match="one per module"):
        combine([lora], [0.5, 0.5])
    with pytest.raises(ml.MergeLabError, match="not all zero"):
        combine([lora], [0.0])


def test_shots_cover_the_labels_and_probe_is_disjoint(tokenizer):
    spec = ml.get_task("emotion")
    shots = draw_shots(spec, tokenizer, 8, seed=1)
    assert len(shots.train) == 8 and len(shots.probe) == 64
    assert set(shots.train.labels.tolist()) == set(range(6))  # every one of the six emotions
    again = draw_shots(spec, tokenizer, 8, seed=1)
    assert torch.equal(again.train.ids, shots.train.ids)  # seeded
    train_rows = {tuple(shots.train.ids[shots.train.offsets[i]:shots.train.offsets[i + 1]].tolist()) for i in range(8)}
    probe_rows = {tuple(shots.probe.ids[shots.probe.offsets[i]:shots.probe.offsets[i + 1]].tolist()) for i in range(64)}
    assert not train_rows & probe_rows


def test_every_measure_is_signed_and_finite(modules, tokenizer):
    sources = [read_module(modules[("lora", t)]) for t in ("cola", "emotion")]
    shots = draw_shots(ml.get_task("sst2"), tokenizer, 8, seed=0)
    found = measure(sources, shots, steps=3)
    assert set(found.scores) == set(MEASURES)
    for name, per_source in found.scores.items():
        assert set(per_source) == {m.ref.spec for m in sources}
        assert all(math.isfinite(v) for v in per_source.values()), name
    for name in ("loss", "el2n", "grand", "euclidean", "kl"):  # "lower is better" quantities, negated
        assert all(v <= 0 for v in found.scores[name].values()), name
    assert all(-1 <= v <= 1 for v in found.scores["cosine"].values())
    layers = found.layers["weight_cosine"][sources[0].ref.spec]
    assert len(layers) == 4  # query and value of 2 layers
    per_layer = layer_weights(found, "weight_cosine", 0.1, "layer", sources)
    assert all(sum(w) == pytest.approx(1.0) for w in per_layer.values()) and len(per_layer) == 4


def test_registry_describes_every_measure():
    assert list(MEASURES) == ["loss", "kl", "el2n", "grand", "cosine", "weight_cosine", "euclidean", "performance"]
    assert {n: m.default_temperature for n, m in MEASURES.items()} == {  # the paper's temperatures
        "loss": 0.1, "kl": 0.1, "el2n": 0.1, "grand": 0.1, "cosine": 0.1, "weight_cosine": 0.001, "euclidean": 0.1,
        "performance": 0.001}
    for name, m in MEASURES.items():
        assert m.name == name and m.title and m.direction and m.doc and m.needs and set(m.needs) <= set(NEEDS)
        assert "Lv et al. 2023" in m.paper and "Sec. 3.2" in m.paper
    assert get_measure("kl") is MEASURES["kl"]
    with pytest.raises(ml.MergeLabError, match="unknown similarity 'vibes'") as caught:
        get_measure("vibes")
    assert caught.value.param == "similarity"
    with pytest.raises(RuntimeError, match="registered twice"):
        register_measure(MEASURES["loss"])
    with pytest.raises(ValueError, match="needs"):
        Measure("odd", "Odd", "+", ("vibes",), "none", lambda ctx: 0.0)


@pytest.fixture()
def toy_measure():
    """A measure registered for one test (the number of the source module's own tensors), then removed."""
    toy = register_measure(Measure("toy", "Toy: tensor count", "+tensors: more is more similar", (WEIGHTS,),
                                   "none (a test)", lambda ctx: float(len(ctx.source.body)), 1.0,
                                   "Counts the module's own tensors."))
    yield toy
    MEASURES.pop("toy", None)


def test_a_registered_measure_reaches_the_picker_and_the_engine(toy_measure, modules, tokenizer):
    pytest.importorskip("gradio")
    from views.ensemble_tab import measure_choices, measure_info, temperature_info

    assert "toy" in importlib.import_module("merging_core.ensemble").MEASURES
    assert measure_choices() == list(MEASURES) and measure_choices()[-1] == "toy"
    assert "Toy: tensor count" in measure_info("toy") and "toy)" in temperature_info()
    sources = [read_module(modules[("lora", t)]) for t in ("cola", "emotion")]
    found = measure(sources, draw_shots(ml.get_task("sst2"), tokenizer, 8, seed=0), measures=("toy",), steps=1)
    assert found.scores == {"toy": {m.ref.spec: float(len(m.body)) for m in sources}}


def test_ensemble_end_to_end_and_errors(modules):
    sources = [modules[("lora", t)] for t in ("cola", "emotion")]
    result = ml.ensemble("sst2", sources, similarity="el2n", shots=8, seeds=(0, 1), steps=3, limit=16)
    assert [r["init"] for r in result.rows] == ["fresh", "uniform", "weighted"] * 2
    assert all(sum(w.values()) == pytest.approx(1.0) for w in result.weights)
    table = {row["init"]: row for row in result.table()}
    assert table["weighted"]["seeds"] == 2 and 0 <= table["fresh"]["mean"] <= 1
    assert json.loads(json.dumps(result.summary()))["similarity"] == "el2n"
    with pytest.raises(ml.MergeLabError, match="trained on the target task sst2"):
        ml.ensemble("sst2", [modules[("lora", "sst2")], sources[0]], shots=8, steps=1)
    with pytest.raises(ml.MergeLabError, match="unknown similarity"):
        ml.ensemble("sst2", sources, similarity="vibes")
    with pytest.raises(ml.MergeLabError, match="not an adapter module") as caught:
        ml.ensemble("sst2", [str(ml.resolve("minilm").location)])
    assert caught.value.param == "sources" and "python -m" not in str(caught.value)


def test_similarity_matrix_leaves_each_task_out(modules):
    specs = [modules[("ia3", t)] for t in TASKS]
    matrix = similarity_matrix(specs, "loss", shots=8, steps=2)
    assert matrix["tasks"] == list(TASKS)
    for target, row in matrix["scores"].items():
        assert len(row) == 2 and modules[("ia3", target)] not in row


def test_cli_ensemble_json(modules, capsys):
    from merging_core.cli import main

    sources = [modules[("lora", t)] for t in ("cola", "emotion")]
    assert main(["ensemble", "--target", "sst2", "--sources", *sources, "--similarity", "loss", "--shots", "8",
                 "--steps", "2", "--limit", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["target"] == "sst2" and len(out["weights"][0]) == 2 and out["temperature"] == 0.1
