"""The engine refuses silently wrong results, and every bad input file or value is one clear error.

Each case goes through the Python API (a `MergeLabError`) and, where a command takes the input, through
the CLI in-process (`cli.main` returns 2 and prints exactly one line `error: ...` on stderr, no traceback).
"""

from __future__ import annotations

import errno
import math
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import merging_core as ml
from merging_core import zoo
from merging_core.cli import main
from merging_core.errors import MergeLabError
from merging_core.merge import merge
from merging_core.params import Param
from merging_core.training import TrainConfig


class NotATensor:
    """A custom class: pickled into a pytorch_model.bin, `torch.load(weights_only=True)` refuses it."""


def cli_error(capsys, *argv: str) -> str:
    """Run the CLI in-process; it must fail with status 2 and exactly one line `error: ...` on stderr."""
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def rewrite(folder: Path, change) -> Path:
    """Rewrite `folder`'s model.safetensors as `change(state)` returns it."""
    state = load_file(folder / "model.safetensors")
    save_file(change(state), folder / "model.safetensors", {"format": "pt"})
    return folder


@pytest.fixture()
def copy_of(pico, tmp_path):
    """A private copy of a pico checkpoint, to break."""
    def make(task: str | None = "sst2", seed: int = 0, name: str = "broken") -> Path:
        return Path(shutil.copytree(pico(task, seed), tmp_path / name))

    return make


# ----------------------------------------------------------------------------------------------------
# A1: weights and float parameters


def test_huge_weights_are_normalized_in_float64(pico):
    a, b = str(pico("sst2", 0)), str(pico("sst2", 1))
    huge = merge("average", [a, b], params={"weights": "3e38,3e38"}).state  # float32: 3e38 + 3e38 = inf
    plain = merge("average", [a, b]).state
    assert any(t.abs().sum() > 0 for t in huge.values())
    for name in plain:
        assert torch.equal(huge[name], plain[name]), name


@pytest.mark.parametrize("weights", ["1e308,1e308", "0,0"])
def test_weights_without_a_finite_positive_sum_are_refused(weights, pico, tmp_path, capsys):
    a, b = str(pico("sst2", 0)), str(pico("sst2", 1))
    with pytest.raises(MergeLabError, match="weights") as caught:
        merge("average", [a, b], params={"weights": weights})
    assert caught.value.param == "weights"
    line = cli_error(capsys, "merge", "--method", "average", "--models", a, b, "--set", f"weights={weights}",
                     "--out", tmp_path / "m")
    assert "weights" in line and not (tmp_path / "m").exists()


@pytest.mark.parametrize("kind, value", [("float", "inf"), ("float", "-inf"), ("float", math.inf),
                                         ("float", "nan"), ("floats", "1,inf"), ("floats", [1.0, math.nan]),
                                         ("int", math.inf), ("int", "inf")])
def test_parameters_refuse_inf_and_nan(kind, value):
    with pytest.raises(MergeLabError) as caught:
        Param("x", kind, None, "a parameter").parse(value, "method m")
    assert caught.value.param == "x"


def test_inf_weight_is_one_line_error_in_the_cli(pico, tmp_path, capsys):
    a, b = str(pico("sst2", 0)), str(pico("sst2", 1))
    assert "weights" in cli_error(capsys, "merge", "--method", "average", "--models", a, b,
                                  "--set", "weights=inf,1", "--out", tmp_path / "m")


# ----------------------------------------------------------------------------------------------------
# A2: a checkpoint with NaN weights cannot be scored


@pytest.mark.parametrize("task", ["sst2", "stsb", "conll2003", "wikitext2"])
def test_nan_weights_fail_an_evaluation(task, copy_of, capsys):
    def poison(state):
        key = next(k for k in state if k.endswith("encoder.layer.0.attention.self.query.weight"))
        state[key][0, 0] = float("nan")
        return state

    broken = rewrite(copy_of(task), poison)
    with pytest.raises(MergeLabError, match="non-finite logits.*NaN/inf weights"):
        ml.evaluate(str(broken), task, limit=16)
    assert "non-finite logits" in cli_error(capsys, "eval", "--model", broken, "--task", task, "--limit", "16")


# ----------------------------------------------------------------------------------------------------
# A3: every model holds the same parameters; a load with missing or unexpected tensors fails


def _without_layer_1(state):
    return {k: v for k, v in state.items() if ".encoder.layer.1." not in k}


@pytest.mark.parametrize("first", [True, False])
def test_merge_refuses_a_model_missing_a_layer(first, copy_of, pico, tmp_path, capsys):
    broken = str(rewrite(copy_of("sst2", 0), _without_layer_1))
    good = str(pico("sst2", 1))
    models = [broken, good] if first else [good, broken]
    with pytest.raises(MergeLabError, match=r"encoder\.layer\.1\.") as caught:
        merge("average", models)
    assert caught.value.param == "models" and Path(broken).name in str(caught.value)
    assert "encoder.layer.1." in cli_error(capsys, "merge", "--method", "average", "--models", *models,
                                           "--out", tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_base_with_other_parameters_is_refused(copy_of, pico):
    broken = str(rewrite(copy_of("sst2", 9), _without_layer_1))
    with pytest.raises(MergeLabError, match=r"encoder\.layer\.1\.") as caught:
        merge("task_arithmetic", [str(pico("sst2", 0)), str(pico("sst2", 1))], base=broken)
    assert caught.value.param == "base"


def test_loading_a_checkpoint_missing_tensors_fails(copy_of, capsys):
    broken = rewrite(copy_of("sst2"), _without_layer_1)
    with pytest.raises(MergeLabError, match=r"missing .*encoder\.layer\.1\."):
        ml.evaluate(str(broken), "sst2", limit=8)
    assert "encoder.layer.1." in cli_error(capsys, "eval", "--model", broken, "--task", "sst2", "--limit", "8")


def test_scoring_a_checkpoint_without_its_head_fails(copy_of):
    broken = rewrite(copy_of("sst2"), lambda s: {k: v for k, v in s.items() if not k.startswith("classifier.")})
    with pytest.raises(MergeLabError, match=r"classifier\.weight"):
        ml.evaluate(str(broken), "sst2", limit=8)


def test_loading_a_checkpoint_with_unexpected_tensors_fails(copy_of):
    def extra(state):
        state["bert.encoder.layer.2.output.dense.weight"] = torch.zeros(32, 64)
        return state

    broken = rewrite(copy_of("sst2"), extra)
    with pytest.raises(MergeLabError, match=r"unexpected .*encoder\.layer\.2\.output\.dense\.weight"):
        ml.evaluate(str(broken), "sst2", limit=8)


def test_fresh_heads_and_unused_poolers_still_load(pico):
    """What is legitimate: a bare encoder gets a new head (and an MLM head), a token model drops the pooler."""
    for task in ("sst2", "conll2003", "wikitext2"):
        ml.models.load(str(pico(None)), ml.get_task(task), new_head=True, device="cpu")
    ml.models.load(str(pico("conll2003")), ml.get_task("sst2"), new_head=True, device="cpu")  # a fresh pooler too
    ml.models.load(str(pico("sst2")), ml.get_task("conll2003"), new_head=True, device="cpu")
    ml.models.load(str(pico("sst2")), ml.get_task("cola"), new_head=True, device="cpu")  # same shape: kept
    ml.models.load(str(pico("sst2")), ml.get_task("mnli"), new_head=True, device="cpu")  # 3 labels: fresh


# ----------------------------------------------------------------------------------------------------
# A4: learning rates


@pytest.mark.parametrize("lr", ["nan", "inf", "0", "-1e-4"])
def test_bad_learning_rate_is_one_line_error(lr, pico, tmp_path, capsys):
    with pytest.raises(MergeLabError) as caught:
        TrainConfig("sst2", base=str(pico(None)), lr=float(lr))
    assert caught.value.param == "lr"
    assert "--lr" in cli_error(capsys, "train", "--base", pico(None), "--task", "sst2", f"--lr={lr}", "--steps", "1",
                               "--out", tmp_path / "t")
    assert not (tmp_path / "t").exists()


# ----------------------------------------------------------------------------------------------------
# B: bad files


def _truncate(folder: Path) -> None:
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _huge_header(folder: Path) -> None:
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 2 ** 62) + data[8:])


def _garbage(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + bytes(64))


@pytest.mark.parametrize("damage", [_truncate, _huge_header, _garbage])
def test_broken_safetensors_is_one_line_error(damage, copy_of, pico, tmp_path, capsys):
    broken = copy_of("sst2")
    damage(broken)
    good = str(pico("sst2", 1))
    with pytest.raises(MergeLabError, match="model.safetensors.*not a valid safetensors file"):
        merge("average", [good, str(broken)])
    with pytest.raises(MergeLabError, match="model.safetensors.*not a valid safetensors file"):
        ml.evaluate(str(broken), "sst2", limit=8)
    assert "not a valid safetensors file" in cli_error(capsys, "merge", "--method", "average", "--models", good,
                                                        broken, "--out", tmp_path / "m")
    assert "not a valid safetensors file" in cli_error(capsys, "eval", "--model", broken, "--task", "sst2")


def test_pickle_refused_by_weights_only_is_one_line_error(copy_of, pico, tmp_path, capsys):
    folder = copy_of("sst2")
    (folder / "model.safetensors").unlink()
    torch.save({"bert.embeddings.word_embeddings.weight": NotATensor()}, folder / "pytorch_model.bin")
    with pytest.raises(MergeLabError, match="pytorch_model.bin"):
        ml.evaluate(str(folder), "sst2", limit=8, allow_pickle=True)
    good = str(pico("sst2", 1))
    with pytest.raises(MergeLabError, match="pytorch_model.bin"):
        merge("average", [good, str(folder)], allow_pickle=True)
    assert "pytorch_model.bin" in cli_error(capsys, "eval", "--model", folder, "--task", "sst2", "--allow-pickle")
    assert "pytorch_model.bin" in cli_error(capsys, "merge", "--method", "average", "--models", good, folder,
                                            "--allow-pickle", "--out", tmp_path / "m")


def test_truncated_pickle_is_one_line_error(copy_of):
    folder = copy_of("sst2")
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    data = (folder / "pytorch_model.bin").read_bytes()
    (folder / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(MergeLabError, match="pytorch_model.bin"):
        ml.evaluate(str(folder), "sst2", limit=8, allow_pickle=True)


def test_statistics_file_that_is_not_one(pico, tmp_path, capsys):
    a, b = str(pico("sst2", 0)), str(pico("sst2", 1))
    noise = tmp_path / "noise.safetensors"
    noise.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(MergeLabError, match="noise.safetensors") as caught:
        merge("regmean", [a, b], stats_files=[str(noise), str(noise)])
    assert caught.value.param == "stats_files"
    with pytest.raises(MergeLabError, match="noise.safetensors"):
        ml.stats.load_stats(noise)
    assert "noise.safetensors" in cli_error(capsys, "merge", "--method", "regmean", "--models", a, b,
                                            "--stats-file", noise, noise, "--out", tmp_path / "m")


def test_statistics_file_with_a_broken_record(tmp_path):
    path = tmp_path / "odd.safetensors"
    save_file({"x::gram": torch.eye(2)}, path, metadata={"record": "{not json"})
    with pytest.raises(MergeLabError, match="odd.safetensors"):
        ml.stats.load_stats(path)
    save_file({"x::gram": torch.eye(2)}, path, metadata={"record": "[1, 2]"})
    with pytest.raises(MergeLabError, match="odd.safetensors"):
        ml.stats.load_stats(path)


@pytest.mark.parametrize("text", [
    "models: [unclosed\n  - : :\n",  # not YAML
    "- a\n- b\n",  # a list, not a mapping
    "models:\n  - sst2-s0\n",  # models as a list
    "models:\n  x: 3\n",  # an entry that is not a mapping
    "defaults: 7\nmodels:\n  x: {task: sst2}\n",  # defaults not a mapping
    "models:\n  x: {task: sst2, steps: many}\n",  # a setting of the wrong type
    "models:\n  x: {task: sst2, lr: .nan}\n",  # a bad learning rate
    "models:\n  x: {steps: 3}\n",  # no task
])
def test_bad_recipe_is_one_line_error(text, tmp_path, capsys, isolated_home):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(MergeLabError, match="recipe"):
        zoo.load_recipe(path)
    assert "recipe" in cli_error(capsys, "zoo", "build", "--recipe", path)


def test_recipe_numbers_in_exponent_form_are_read(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("models:\n  x: {task: sst2, lr: 1e-4, steps: 3}\n")  # YAML 1.1 reads 1e-4 as a string
    assert zoo.load_recipe(path).entries["x"].learning_rate == pytest.approx(1e-4)


def _under_a_file(tmp_path: Path) -> Path:
    (tmp_path / "plain-file").write_text("not a folder")
    return tmp_path / "plain-file" / "out"


@pytest.mark.parametrize("where", [lambda tmp: Path("/proc/mergelab-x"), _under_a_file])
def test_output_path_the_os_refuses(where, pico, tmp_path, capsys):
    out = where(tmp_path)
    a, b = str(pico("sst2", 0)), str(pico("sst2", 1))
    with pytest.raises(MergeLabError, match=str(out)) as caught:
        merge("average", [a, b], out=out)
    assert caught.value.param == "out"
    assert str(out) in cli_error(capsys, "merge", "--method", "average", "--models", a, b, "--out", out)
    assert str(out) in cli_error(capsys, "train", "--base", pico(None), "--task", "sst2", "--steps", "1",
                                 "--batch-size", "2", "--eval-limit", "4", "--out", out)


def test_write_failure_names_the_output(pico, tmp_path, monkeypatch, capsys):
    def full(self, name, tensor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ml.tensorio.StreamingWriter, "write", full)
    a, b = str(pico("sst2", 0)), str(pico("sst2", 1))
    with pytest.raises(MergeLabError, match="No space left on device") as caught:
        merge("average", [a, b], out=tmp_path / "m")
    assert caught.value.param == "out" and str(tmp_path / "m") in str(caught.value)
    assert not (tmp_path / "m").exists() and not list(tmp_path.iterdir())  # nothing left behind
    assert "No space left" in cli_error(capsys, "merge", "--method", "average", "--models", a, b,
                                        "--out", tmp_path / "m")


def test_training_write_failure_names_the_output(pico, tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ml.training, "write_into", full)
    config = TrainConfig("sst2", base=str(pico(None)), steps=1, batch_size=2, eval_limit=4)
    with pytest.raises(MergeLabError, match="No space left on device") as caught:
        ml.training.train(config, tmp_path / "t")
    assert caught.value.param == "out" and not (tmp_path / "t").exists()


@pytest.mark.parametrize("name, text", [
    ("config.json", "{not json"),
    ("config.json", "[1, 2]"),
    ("config.json", '{"hidden_size": 32}'),  # no model_type
    ("tokenizer.json", "{not json"),
    ("mergelab.json", "{not json"),
    ("mergelab.json", "[]"),
])
def test_damaged_side_files_are_one_line_errors(name, text, copy_of, pico, tmp_path, capsys):
    broken = copy_of("sst2")
    (broken / name).write_text(text)
    good = str(pico("sst2", 1))
    with pytest.raises(MergeLabError, match=name.replace(".", r"\.")):
        merge("average", [good, str(broken)])
    assert name in cli_error(capsys, "merge", "--method", "average", "--models", good, broken, "--out", tmp_path / "m")
    assert name in cli_error(capsys, "eval", "--model", broken, "--task", "sst2", "--limit", "4")


def test_merge_config_that_is_not_one(tmp_path):
    (tmp_path / "merge_config.json").write_text("{not json")
    with pytest.raises(MergeLabError, match="merge_config.json"):
        ml.merge_from_config(tmp_path)
    (tmp_path / "merge_config.json").write_text('{"method": "average"}')
    with pytest.raises(MergeLabError, match="merge_config.json"):
        ml.merge_from_config(tmp_path)
    with pytest.raises(MergeLabError, match="merge_config.json"):
        ml.merge_from_config(tmp_path / "nowhere")


def test_cli_errors_are_always_one_line(monkeypatch, capsys):
    def fail(args):
        raise MergeLabError("first line\nsecond line")

    monkeypatch.setattr(ml.cli, "_run", fail)
    assert cli_error(capsys, "tasks") == "error: first line second line"


@pytest.mark.parametrize("make", [
    lambda: ml.CurveSpec(("a", "b"), path="bezier", bend_lr=math.nan),
    lambda: ml.CurveSpec(("a", "b"), bend_lr=math.inf),
    lambda: ml.CurveSpec(("a", "b"), bend_lr=0.0),
    lambda: ml.PlaneSpec(("a", "b", "c"), margin=math.inf),
    lambda: ml.PlaneSpec(("a", "b", "c"), margin=math.nan),
])
def test_path_settings_must_be_finite(make):
    with pytest.raises(MergeLabError) as caught:
        make()
    assert caught.value.param in ("bend_lr", "margin")


def test_module_weights_must_be_finite():
    from merging_core.ensemble.modules import _normalised

    for weights in ([math.inf, 1.0], [1e308, 1e308], [math.nan, 1.0], [0.0, 0.0]):
        with pytest.raises(MergeLabError, match="finite"):
            _normalised(weights, 2)
