"""`MergeSpec`: checked on construction, one parameter grammar, JSON round trips, and merge_config.json
re-running every method's merge (from shared statistics files too, without the data)."""

from __future__ import annotations

import dataclasses
import json
import pickle

import pytest
import torch
from safetensors.torch import load_file

import merging_core as ml
from merging_core.errors import MergeLabError
from merging_core.methods import METHODS
from merging_core.params import parse_assignments
from merging_core.spec import MergeSpec, parse_method_text

from .golden.pico_merges import synthetic_stats


@pytest.fixture(scope="module")
def models(pico):
    return [str(pico("sst2", s)) for s in (0, 1, 2)]


def _files(folder) -> dict[str, torch.Tensor]:
    return {f"{f.relative_to(folder)}::{k}": v for f in sorted(folder.rglob("*.safetensors"))
            for k, v in load_file(f).items()}


def test_spec_fills_defaults_checks_values_and_is_frozen(models):
    spec = MergeSpec("ties", models[:2], base=models[2], params={"density": "0.5"})
    assert spec.params == {"density": 0.5, "scope": "model", "lambda": 1.0, "zero_sign": "auto", "tie_break": "sort"}
    assert spec.models == tuple(models[:2]) and spec.components == ml.arch.GROUPS
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.method = "average"
    with pytest.raises(TypeError):
        spec.params["density"] = 0.9
    with pytest.raises(MergeLabError) as caught:
        MergeSpec("ties", models[:2], params={"density": 2})
    assert caught.value.param == "density"
    with pytest.raises(MergeLabError) as caught:
        MergeSpec("slerp", models[:1])
    assert caught.value.param == "models"
    with pytest.raises(MergeLabError) as caught:
        MergeSpec("average", models[:2], components=("attn",))
    assert caught.value.param == "components"


def test_spec_round_trips_through_json_and_pickle(models):
    spec = MergeSpec("dare", models[:2], base=models[2], params={"drop_rate": 0.3, "seed": 4},
                     components=("attention", "feed_forward"), fallback="first", stats_tasks=("sst2",))
    assert MergeSpec.from_json(spec.to_json()) == spec
    assert pickle.loads(pickle.dumps(spec)) == spec
    assert spec.seed == 4  # the method's own seed wins, and is what the spec records


@pytest.mark.parametrize("texts, expected", [
    (["density=0.5,scope=tensor"], {"density": "0.5", "scope": "tensor"}),
    (["density=0.5", "scope=tensor"], {"density": "0.5", "scope": "tensor"}),
    (["weights=3,1", "lambda=0.4"], {"weights": "3,1", "lambda": "0.4"}),
    (["weights=3,1,lambda=0.4"], {"weights": "3,1", "lambda": "0.4"}),
])
def test_one_grammar_for_parameter_text(texts, expected):
    assert parse_assignments(texts) == expected


def test_a_key_given_twice_is_an_error():
    with pytest.raises(MergeLabError, match="'density' is given twice") as caught:
        parse_assignments(["density=0.5", "density=0.3"])
    assert caught.value.param == "density"
    with pytest.raises(MergeLabError, match="not key=value"):
        parse_assignments(["0.5"])
    assert parse_method_text("ties:density=0.2,scope=tensor") == ("ties", {"density": "0.2", "scope": "tensor"})
    assert parse_method_text("average:weights=3,1") == ("average", {"weights": "3,1"})


def test_repeated_set_flags_accumulate(models, tmp_path, capsys):
    from merging_core.cli import main

    assert main(["merge", "--method", "ties", "--models", *models[:2], "--base", models[2], "--set", "density=0.5",
                 "--set", "scope=tensor", "--out", str(tmp_path / "m")]) == 0
    config = json.loads((tmp_path / "m" / "merge_config.json").read_text())
    assert config["params"]["density"] == 0.5 and config["params"]["scope"] == "tensor"
    assert main(["merge", "--method", "ties", "--models", *models[:2], "--base", models[2], "--set", "density=0.5",
                 "--set", "density=0.3", "--out", str(tmp_path / "n")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --set density=...: 'density' is given twice") and "\n" not in err
    assert not (tmp_path / "n").exists()


def test_errors_name_the_flag_in_the_cli_and_the_label_in_the_app(models, capsys):
    from merging_core.cli import main
    from views import merge_tab

    error = MergeLabError("method 'ties' needs a base model", param="base", hint="e.g. minilm")
    assert str(error) == "base: method 'ties' needs a base model; e.g. minilm"
    assert error.render(merge_tab.LABELS).startswith("Base model: method")
    assert main(["merge", "--method", "ties", "--models", *models[:2], "--out", "/tmp/never"]) == 2
    assert capsys.readouterr().err.startswith("error: --base: method 'ties' adds task vectors")
    assert main(["merge", "--method", "ties", "--models", *models[:2], "--set", "dencity=1", "--out", "/tmp/x"]) == 2
    assert capsys.readouterr().err.startswith("error: --set dencity=...: method 'ties' has no parameter 'dencity'")


def _config_round_trip(spec: MergeSpec, tmp_path, **run) -> None:
    first = ml.merge(spec, out=tmp_path / "first", **run)
    config = json.loads((tmp_path / "first" / "merge_config.json").read_text())
    assert MergeSpec.from_dict(config) == first.spec  # the file holds the spec that ran
    ml.merge_from_config(tmp_path / "first", tmp_path / "again")
    ours, again = _files(tmp_path / "first"), _files(tmp_path / "again")
    assert sorted(ours) == sorted(again)
    for name in ours:
        assert torch.equal(ours[name], again[name]), name


@pytest.mark.parametrize("method", sorted(METHODS))
def test_merge_config_re_runs_every_method(method, models, pico, tmp_path):
    params = {"examples": 8} if "examples" in {p.name for p in METHODS[method].params} else {}
    pair = [str(pico("sst2", 0)), str(pico("cola", 1))] if method != "slerp" else models[:2]
    spec = MergeSpec(method, pair, base=str(pico(None, 5)), params=params)
    _config_round_trip(spec, tmp_path)


@pytest.mark.parametrize("method, kinds, params", [
    ("regmean", ["gram"], {}), ("fisher", ["fisher"], {}), ("mats", ["gram", "grad_gram"], {"objective": "kfac"})])
def test_merge_from_statistics_files_re_runs_without_the_data(method, kinds, params, models, tmp_path, monkeypatch):
    files = tuple(str(synthetic_stats(m, kinds, tmp_path, seed)) for seed, m in enumerate(models[:2]))
    spec = MergeSpec(method, models[:2], base=models[2], params=params, stats_files=files)
    empty = tmp_path / "no-data"
    empty.mkdir()
    monkeypatch.setenv("MERGELAB_DATA", str(empty))  # nothing to compute statistics from
    _config_round_trip(spec, tmp_path)
    config = json.loads((tmp_path / "first" / "merge_config.json").read_text())
    assert config["stats_files"] == list(files) and config["stats_tasks"] is None
    with pytest.raises(MergeLabError, match="is not in the data root"):
        ml.merge(dataclasses.replace(spec, stats_files=None, stats_tasks=("sst2",)))  # the data really is gone
