"""The registry is the only list of methods: every picker reads it, and a method added in one file
(here a toy one, in a temporary module) appears in each of them, in the CLI's listing, and merges."""

from __future__ import annotations

import importlib
import json
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from merging_core.methods import METHODS

TOY = textwrap.dedent('''
    """A toy method: the elementwise median of the models (for the registry test)."""
    import torch

    from merging_core.methods import Method, Param, TensorJob, register


    def median(job: TensorJob) -> torch.Tensor:
        return torch.stack(job.tensors).median(0).values * job.params["scale"]


    register(Method(name="toy_median", title="Toy median", family="data-free", paper="(a test)",
                    params=(Param("scale", "float", 1.0, "multiplies the median", low=0.0, high=2.0),),
                    merge_tensor=median, min_models=2, neutral={}, doc="Elementwise median."))
''')


@pytest.fixture()
def toy_method(tmp_path, monkeypatch):
    (tmp_path / "toy_registry_method.py").write_text(TOY)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module("toy_registry_method")
    yield "toy_median"
    METHODS.pop("toy_median", None)
    sys.modules.pop("toy_registry_method", None)


def pickers() -> dict[str, set[str]]:
    """Every place a user picks a method, as the set of names it offers."""
    from merging_core.cli import _parser
    from views import curves_tab, merge_tab

    parser = _parser()
    commands = next(a for a in parser._actions if hasattr(a, "choices") and isinstance(a.choices, dict)).choices
    listed = {}  # the methods each CLI flag's help offers
    for command, dest in (("merge", "method"), ("compare", "methods"), ("greedy", "method"), ("curve", "merges")):
        flag = next(a for a in commands[command]._actions if a.dest == dest)
        listed[f"{command} --{dest}"] = set(flag.help.split("(methods: ")[1].rstrip(")").split(", "))
    return {"Merge tab": {value for _, value in merge_tab.method_choices()},
            "Curves tab": {value for _, value in curves_tab.merge_choices()}, **listed}


def test_every_registered_method_is_in_every_picker():
    for where, names in pickers().items():
        assert names == set(METHODS), where


def test_a_method_added_in_one_file_reaches_every_picker_and_merges(toy_method, pico, tmp_path, capsys):
    from merging_core import merge
    from merging_core.cli import main
    from merging_core.spec import parse_method_text

    for where, names in pickers().items():
        assert toy_method in names, where
    assert parse_method_text(f"{toy_method}:scale=0.5") == (toy_method, {"scale": "0.5"})  # compare --methods
    assert main(["methods", "--json"]) == 0
    listed = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert listed[toy_method]["params"][0]["name"] == "scale"

    models = [str(pico("sst2", s)) for s in (0, 1, 2)]
    assert main(["merge", "--method", toy_method, "--models", *models, "--set", "scale=1",
                 "--out", str(tmp_path / "m")]) == 0
    merged = load_file(tmp_path / "m" / "model.safetensors")
    inputs = [load_file(f"{m}/model.safetensors") for m in models]
    key = "bert.encoder.layer.0.attention.self.query.weight"
    assert torch.equal(merged[key], torch.stack([s[key] for s in inputs]).median(0).values)
    assert merge(toy_method, models[:1] * 2).state  # the registry's checks apply to it too


def test_an_unknown_method_is_one_line_naming_the_flag(pico, capsys):
    from merging_core.cli import main

    assert main(["merge", "--method", "magic", "--models", str(pico("sst2", 0)), "--out", "/tmp/never"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --method: unknown merge method 'magic'; choose one of: average") and "\n" not in err
