"""The Ensemble tab's handlers as plain functions: the status and merge command follow the temperature
slider from a stored run, the few-shot table's headers, defaults from the zoo's modules, and errors about
missing modules worded for the app and the command line alike."""

from __future__ import annotations

import json

import pytest

import merging_core as ml
from merging_core.ensemble import (
    EnsembleResult,
    command_at,
    default_sources,
    default_target,
    matrix_modules,
    merge_command,
    softmax_weights,
)
from merging_core.ensemble.similarity import Scores

pytest.importorskip("gradio")

from views import ensemble_tab

SCORES = {"lora-cola": -0.5, "lora-emotion": -1.0}
ROWS = [{"init": "fresh", "seed": 0, "metric": "accuracy", "score": 0.5, "loss": 0.7, "seconds": 1.0},
        {"init": "uniform", "seed": 0, "metric": "accuracy", "score": 0.55, "loss": 0.7, "seconds": 1.0},
        {"init": "weighted", "seed": 0, "metric": "accuracy", "score": 0.6, "loss": 0.6, "seconds": 1.0}]


def _result(temperature: float = 0.001) -> EnsembleResult:
    scores = Scores("sst2", 0, 8, scores={"loss": dict(SCORES)})
    return EnsembleResult("sst2", list(SCORES), "loss", temperature, "model", 8, [scores],
                          [softmax_weights(SCORES, temperature)], list(ROWS))


def _state(result: EnsembleResult) -> dict:
    """What `run_ensemble` stores in the tab's gr.State."""
    return {"measure": result.similarity, "scores": [s.scores[result.similarity] for s in result.scores],
            "sources": result.sources, "target": result.target, "temperature": result.temperature,
            "table": result.table(), "shots": result.shots, "seeds": len(result.scores)}


def test_the_engine_gives_the_merge_command_at_any_temperature():
    result = _result(0.001)
    assert result.merge_command() == merge_command(result.sources, result.weights[0])
    assert "--set weights=1.0000,0.0000" in result.merge_command()
    assert "--set weights=0.5012,0.4988" in result.merge_command(100.0)
    summary = json.loads(json.dumps(result.summary()))  # plain values, as a gr.State holds them
    assert command_at(summary, 100.0) == result.merge_command(100.0)


def test_status_and_command_follow_the_slider():
    state = _state(_result(0.001))
    measured = ensemble_tab.ensemble_status(state, -3.0)
    assert "measured at T = 0.001" in measured and "best start: **weighted** (accuracy 0.6000)" in measured
    assert "re-run" not in measured and "(T = 0.001)" in measured and "weights=1.0000,0.0000" in measured
    moved = ensemble_tab.ensemble_status(state, 2.0)
    assert "measured at T = 0.001" in moved  # the few-shot scores are still the measured ones
    assert "re-run to measure at T = 100" in moved and "(T = 100)" in moved and "(T = 0.001)" not in moved
    assert "weights=0.5012,0.4988" in moved  # the command has the slider's weights
    assert ensemble_tab.status_view(None, 2.0) is not None and ensemble_tab.ensemble_status(None, 2.0) == ""


def test_the_few_shot_table_has_headers_even_when_empty():
    assert list(ensemble_tab.few_shot_table([]).columns) == ["init", "seeds", "metric", "mean", "sd"]
    table = ensemble_tab.few_shot_table(_result().table())
    assert list(table["init"]) == ["fresh", "uniform", "weighted"]
    label = ensemble_tab.table_label(_state(_result(0.1))).constructor_args["label"]
    assert label.endswith("measured at T = 0.1")  # which temperature its few-shot scores belong to


def _module(home, name: str, task: str, kind: str = "lora") -> None:
    folder = home / "zoo" / name
    folder.mkdir(parents=True)
    (folder / "mergelab.json").write_text(json.dumps({"task": task, "kind": kind, "base": "minilm"}))


def test_missing_modules_are_explained_in_plain_words(isolated_home):
    with pytest.raises(ml.MergeLabError) as caught:
        default_sources("sst2", "lora")
    message = caught.value.message
    assert message.startswith("the zoo has 0 lora modules; transfer to SST-2 needs at least one lora module")
    assert "build the `demo` or `peft` recipe (Zoo tab, or `zoo build --recipe demo`)" in message
    assert "python -m" not in message and caught.value.param == "sources"
    with pytest.raises(ml.MergeLabError) as caught:
        matrix_modules("lora")
    assert caught.value.message == ("the zoo has 0 lora modules; the matrix needs at least 3: build the `demo` or "
                                 "`peft` recipe (Zoo tab, or `zoo build --recipe demo`)")
    with pytest.raises(ml.MergeLabError, match=r"the zoo has 0 ia3 modules; .*build the `peft` recipe"):
        matrix_modules("ia3")  # the demo recipe has no (IA)3 modules
    _module(isolated_home, "demo-lora-sst2", "sst2")
    with pytest.raises(ml.MergeLabError, match="none of the zoo's 1 lora module is of a classification, regression "
                                               "or token task other than SST-2"):
        default_sources("sst2", "lora")


def test_defaults_come_from_the_zoo_modules(isolated_home):
    assert ensemble_tab.target_default() == "cola"  # no modules: the first target
    for task in ("sst2", "emotion", "mrpc"):  # the demo recipe's LoRA modules
        _module(isolated_home, f"demo-lora-{task}", task)
    assert default_target(["cola", "sst2", "mrpc"]) == "sst2"  # a target with modules of other tasks, and its own
    assert default_target(["cola"]) == "cola" and default_target(["cola"], "ia3") is None
    assert ensemble_tab.target_default() == "sst2"
    assert ("SST-2", "sst2") in ensemble_tab.target_choices()
    target, sources = (u.constructor_args for u in ensemble_tab.refresh("lora", None, []))
    assert target["value"] == "sst2" and ("SST-2", "sst2") in target["choices"]
    assert sources["value"] == ["demo-lora-emotion", "demo-lora-mrpc"]
    kept_target, kept_sources = (u.constructor_args for u in ensemble_tab.refresh("lora", "mrpc", ["demo-lora-sst2"]))
    assert kept_target["value"] == "mrpc" and kept_sources["value"] == ["demo-lora-sst2"]  # choices made are kept
