"""The CLI end to end: real processes on the packaged MiniLM with small limits, and in-process calls."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from merging_core.cli import main

from .conftest import REPO


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "merging_core", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def one_line_error(process: subprocess.CompletedProcess) -> str:
    assert process.returncode == 2, process.stderr
    lines = process.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), process.stderr  # never a traceback
    return lines[0]


@pytest.fixture(scope="module")
def minilm_mrpc(tmp_path_factory) -> str:
    """MiniLM fine-tuned for a few steps on MRPC through the real CLI."""
    out = tmp_path_factory.mktemp("cli") / "mrpc"
    process = run_cli("train", "--base", "minilm", "--task", "MRPC", "--seed", "0", "--steps", "4",
                      "--batch-size", "8", "--eval-limit", "32", "--out", str(out), "--json")
    assert process.returncode == 0, process.stderr
    summary = json.loads(process.stdout)
    assert summary["dev"]["n"] == 32 and summary["task"] == "mrpc"
    return str(out)


@pytest.mark.integration  # fine-tunes (fixture) and scores the packaged MiniLM
def test_eval_json_matches_training_record(minilm_mrpc):
    process = run_cli("eval", "--model", minilm_mrpc, "--task", "mrpc", "--limit", "32", "--json")
    assert process.returncode == 0, process.stderr
    result = json.loads(process.stdout)
    recorded = json.loads(open(os.path.join(minilm_mrpc, "mergelab.json")).read())["scores"]["dev"]
    assert set(result) == {"task", "split", "n", "f1", "accuracy", "loss"}
    assert result["f1"] == recorded["f1"] and result["loss"] == pytest.approx(recorded["loss"], rel=1e-5)


@pytest.mark.integration  # needs the MiniLM fine-tuned by the fixture
def test_errors_are_one_line(minilm_mrpc):
    assert "bare encoder with no head for task sst2" in one_line_error(
        run_cli("eval", "--model", "minilm", "--task", "sst2", "--limit", "4"))
    assert "unknown task 'glue'" in one_line_error(run_cli("eval", "--model", "minilm", "--task", "glue"))
    assert "does not exist" in one_line_error(run_cli("eval", "--model", "./nope", "--task", "sst2"))
    assert "MERGELAB_DATA" in one_line_error(
        run_cli("eval", "--model", minilm_mrpc, "--task", "mrpc", env={"MERGELAB_DATA": "/no/such/root"}))


@pytest.mark.integration  # needs the MiniLM fine-tuned by the fixture
def test_head_that_does_not_fit(minilm_mrpc, capsys):
    assert main(["eval", "--model", minilm_mrpc, "--task", "emotion"]) == 2
    assert "has a head with 2 outputs but task emotion has 6" in capsys.readouterr().err


@pytest.mark.integration  # `train` with the default base: fine-tunes and scores the packaged MiniLM
def test_rte_trains_and_evaluates_with_no_task_code(rte_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MERGELAB_DATA", str(rte_root))
    out = tmp_path / "rte"
    assert main(["train", "--task", "rte", "--steps", "3", "--batch-size", "8", "--out", str(out), "--json"]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["dev"]["n"] == 6 and "accuracy" in trained["dev"]
    assert main(["eval", "--model", str(out), "--task", "RTE", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == trained["dev"]["accuracy"]


def test_zoo_build_and_list(isolated_home, pico, tmp_path, capsys):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(f"defaults: {{base: '{pico(None)}', steps: 2, batch_size: 4, eval_limit: 8}}\n"
                      "models:\n  stsb-a: {task: stsb, seed: 0, save_every: 1}\n  cola-a: {task: cola}\n")
    assert main(["zoo", "build", "--recipe", str(recipe), "--json"]) == 0
    assert [r["status"] for r in json.loads(capsys.readouterr().out)] == ["built", "built"]
    assert main(["zoo", "build", "--recipe", str(recipe), "--json"]) == 0  # resumable: nothing retrained
    assert [r["status"] for r in json.loads(capsys.readouterr().out)] == ["kept", "kept"]
    assert main(["zoo", "list", "--json"]) == 0
    listed = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(listed) == {"cola-a", "stsb-a", "stsb-a/step-1"}
    assert listed["stsb-a"]["metric"] == "pearson" and listed["stsb-a"]["steps"] == 2
    assert listed["stsb-a/step-1"]["steps"] == 1 and listed["cola-a"]["metric"] == "mcc"
    assert main(["eval", "--model", "cola-a", "--task", "cola", "--limit", "8", "--json"]) == 0  # zoo names resolve
    assert json.loads(capsys.readouterr().out)["mcc"] == listed["cola-a"]["score"]


def test_zoo_list_shows_each_entrys_family_and_size(family_zoo, capsys):
    """The columns the app's model pickers show: family, parameter count (read from the safetensors headers,
    equal to the tensors' sizes), head; refreshed when a checkpoint's files change."""
    from safetensors.torch import load_file

    import merging_core as ml

    assert main(["zoo", "list", "--json"]) == 0
    listed = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    for name, family, head in (("pico-sst2", "bert", "sequence"), ("tiny-llama", "llama", "causal"),
                               ("tiny-gpt2-sst2", "gpt2", "sequence")):
        values = sum(t.numel() for t in load_file(family_zoo / "zoo" / name / "model.safetensors").values())
        assert (listed[name]["family"], listed[name]["head"], listed[name]["parameters"]) == (family, head, values)
        assert listed[name]["params"] == ml.catalog.count_text(values)
    assert main(["zoo", "list"]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split()[:5] == ["name", "family", "params", "head", "task"]
    assert next(r for r in rows if r.startswith("tiny-llama ")).split()[1:4] == [
        "llama", listed["tiny-llama"]["params"], "causal"]
    # a rewritten record is read again (the description is cached by the files' stamps)
    (family_zoo / "zoo" / "tiny-llama" / "mergelab.json").write_text(json.dumps({"task": "wikitext2", "kind": "full"}))
    assert ml.catalog.label("tiny-llama").endswith(" · WikiText-2")


def test_labels_read_as_people_write_them():
    from merging_core.catalog import ModelInfo, count_text
    from merging_core.models import HeadInfo

    assert [count_text(n) for n in (None, 999, 7_900, 99_960, 999_960, 22_713_216, 109_482_240, 7_241_732_096)] == [
        "", "999", "7.9K", "100K", "1.0M", "22.7M", "109M", "7.2B"]
    lora = ModelInfo("bert", "bert", 150_000, HeadInfo("sequence", 2), ("sst2",), adapter="lora")
    assert lora.label("lora-sst2") == "lora-sst2 · bert · 150K LoRA · SST-2"
    tasks = ("sst2", "cola", "mrpc", "stsb", "emotion")
    assert ModelInfo("bert", "bert", 22_800_000, HeadInfo(None), tasks, multihead=True).label("mt") == (
        "mt · bert · 22.8M · SST-2, CoLA, MRPC +2")
    # pretrained on internal text: what its head is, not the pretraining task
    assert ModelInfo("llama", "llama", 3_200_000, HeadInfo("causal"), ("corpus",)).label("d0") == (
        "d0 · llama · 3.2M · causal LM")
    assert ModelInfo(None, None, None, None).label("org/model") == "org/model"  # a hub id: nothing read


def test_bad_recipe_entry(tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("models:\n  x: {task: sst2, stepz: 3}\n")
    assert main(["zoo", "build", "--recipe", str(recipe)]) == 2
    assert "unknown setting(s) ['stepz']" in capsys.readouterr().err


def test_tasks_lists_the_data_root(capsys):
    assert main(["tasks", "--json"]) == 0
    rows = {r["task"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["sst2"]["in_data_root"] and not rows["rte"]["in_data_root"]
    assert rows["conll2003"]["kind"] == "token"


def test_default_recipe_covers_the_required_models():
    from merging_core import zoo

    entries = zoo.load_recipe("default").entries
    tasks = [e.task for e in entries.values()]
    assert tasks.count("sst2") >= 2 and {"cola", "mrpc", "stsb", "emotion", "conll2003", "wikitext2"} <= set(tasks)
    assert any(e.save_every for e in entries.values() if e.task == "sst2")
    assert any(e.head_only for e in entries.values() if e.task == "wikitext2")


def test_bad_task_list_is_one_line(tmp_path, capsys):
    assert main(["train", "--task", "sst2,cola,nope", "--steps", "1", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unknown task 'nope'"), err
    assert not (tmp_path / "x").exists()


def test_multitask_recipe():
    from merging_core import zoo

    (entry,) = zoo.load_recipe("multitask").entries.values()
    assert [s.name for s in entry.task_specs] == ["sst2", "cola", "mrpc", "stsb", "emotion"]


def test_scratch_zoo_pairs_and_align(isolated_home, tmp_path, capsys):
    """The different-initialization flow end to end on tiny models: pretrain from scratch, fine-tune,
    find the pairs, align one model to another."""
    import merging_core as ml

    recipe = tmp_path / "scratch.yaml"
    recipe.write_text("defaults: {base: 'scratch:tiny', task: corpus, steps: 2, batch_size: 4, eval_limit: 4}\n"
                      "models:\n  s0: {seed: 0}\n  s1: {seed: 1}\n"
                      "  s0-sst2: {base: s0, task: sst2, eval_limit: 8}\n  s1-sst2: {base: s1, task: sst2, eval_limit: 8}\n")
    assert main(["zoo", "build", "--recipe", str(recipe)]) == 0
    kinds = {(p["a"], p["b"]): p["kind"] for p in ml.zoo.pairs()}
    assert kinds[("s0", "s1")] == "different initializations"
    assert kinds[("s0-sst2", "s1-sst2")] == "different initializations"  # through their pretrained ancestors
    capsys.readouterr()
    out = tmp_path / "aligned"
    assert main(["align", "--a", "s0", "--b", "s1", "--merge-type", "all", "--examples", "8", "--out", str(out),
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["function_preserving"] and summary["text"]["examples"] == 8
    # a Hungarian solve can only raise the matched correlation of the sites it optimises
    for site in ("ff.0", "attn.1", "res.embeddings"):
        assert summary["sites"][site]["after"] >= summary["sites"][site]["before"] - 1e-6
    assert (out / "model.safetensors").is_file() and (out / "alignment" / "permutation.safetensors").is_file()
    assert main(["align", "--a", "s0", "--b", "s1", "--out", str(out)]) == 2  # never overwritten
    assert "already exists" in capsys.readouterr().err


def test_terminated_merge_leaves_nothing_behind(tmp_path, monkeypatch):
    """A merge killed with SIGTERM (`kill`, `timeout`) while writing exits with 143 and removes its staging
    folder and the output folder it claimed: the same command can run again."""
    import importlib
    import signal
    import time

    engine = importlib.import_module("merging_core.merge")

    def killed_while_writing(folder, *args, **kwargs):
        (folder / "model.safetensors").write_bytes(b"half written")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)  # (the handler raises here)

    out = tmp_path / "merged"
    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(engine, "_write", killed_while_writing)
    with pytest.raises(SystemExit) as stopped:
        main(["merge", "--method", "average", "--models", "minilm", "minilm", "--out", str(out)])
    assert stopped.value.code == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == [] and signal.getsignal(signal.SIGTERM) == before
