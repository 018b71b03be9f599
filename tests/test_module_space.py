"""Merging (IA)³ modules in module space: the methods act on the scaling vectors, the output is folded."""

from __future__ import annotations

import json

import pytest
import torch

import merging_core as ml
from merging_core import stats as stats_module
from merging_core.checkpoint import open_checkpoint
from merging_core.models import load, load_tokenizer, resolve
from merging_core.module_space import module_checkpoint, vectors


@pytest.fixture(scope="module")
def ia3(pico, tmp_path_factory):
    """A pico base and (IA)³ modules: two on SST-2 (seeds 0, 1), one on CoLA, and a LoRA module."""
    root = tmp_path_factory.mktemp("ia3")
    base = str(pico(None))
    out = {"base": base}
    for name, task, seed, kind in (("sst2-a", "sst2", 0, "ia3"), ("sst2-b", "sst2", 1, "ia3"),
                                   ("cola", "cola", 2, "ia3"), ("lora", "sst2", 0, "lora")):
        config = ml.TrainConfig(task=task, base=base, steps=4, batch_size=8, peft=kind, eval_limit=8, seed=seed,
                                lr=5e-2)
        out[name] = str(ml.train(config, root / name).out)
    return out


def _encoder(result: ml.MergeResult) -> dict[str, torch.Tensor]:
    return {n: t for n, t in result.state.items() if not n.startswith("classifier")}


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name].float(), b[name].float(), atol=atol, rtol=1e-5, msg=name)


STATS = {"examples": 16}


@pytest.mark.parametrize("method, params", [("average", {}), ("task_arithmetic", {"lambda": 0.7})])
def test_linear_methods_agree_in_both_spaces(ia3, method, params):
    # (IA)³ folds linearly (diag(l) W, W diag(l)), so averages and task arithmetic of the vectors fold to
    # the same weights as the same method on the folded modules.
    models = [ia3["sst2-a"], ia3["sst2-b"]]
    module = ml.merge(method, models, params=params, space="module")
    weights = ml.merge(method, models, params=params, space="weights")
    _close(module.state, weights.state)
    assert ml.MergeSpec(method, models).space == "weights"  # folded unless asked


@pytest.mark.parametrize("method, params", [
    ("average", {}), ("ties", {"density": 1.0, "lambda": 1.0}), ("fisher", STATS), ("regmean", STATS),
    ("mats", {**STATS, "objective": "block_fisher"}), ("mats", {**STATS, "objective": "regmean"}),
    ("mats", {**STATS, "objective": "diagonal_fisher"}),
    ("mats", {**STATS, "objective": "block_fisher", "solver": "closed_form"})])
def test_merging_a_module_with_itself_returns_it(ia3, method, params):
    model = ia3["sst2-a"]
    merged = ml.merge(method, [model, model], params=params, space="module")
    folded = open_checkpoint(model)
    _close(merged.state, {n: folded.get(n) for n in merged.state}, atol=1e-5)


def test_lambda_zero_returns_the_base(ia3):
    merged = ml.merge("task_arithmetic", [ia3["sst2-a"], ia3["cola"]], params={"lambda": 0.0}, space="module")
    base = open_checkpoint(ia3["base"])
    assert merged.tasks == ["cola", "sst2"]  # separate heads, each task its own
    _close(_encoder(merged), {n: base.get(n) for n in _encoder(merged)})


def test_module_space_differs_from_weight_space_for_ties_and_regmean(ia3):
    models = [ia3["sst2-a"], ia3["cola"]]
    for method, params in (("ties", {"density": 0.3}), ("regmean", STATS)):
        module = _encoder(ml.merge(method, models, params=params, space="module"))
        weights = _encoder(ml.merge(method, models, params=params, space="weights"))
        assert any(not torch.allclose(module[n], weights[n], atol=1e-6) for n in module), method
        assert all(torch.isfinite(t).all() for t in module.values())


def test_regmean_of_vectors_is_the_gram_weighted_mean(ia3):
    models = [ia3["sst2-a"], ia3["cola"]]
    merged = ml.merge("regmean", models, params=STATS, space="module")
    assert merged.config["stats"][0]["space"] == "module"
    grams = [ml.stats.statistics(m, task, ("gram",), STATS, space="module")
             for m, task in zip(models, ("sst2", "cola"))]
    name = "encoder.layer.0.attention.self.key.ia3_l"
    thetas = [vectors(module_checkpoint(resolve(m))).get(name).double() for m in models]
    g = [s[name]["gram"].double().reshape(thetas[0].shape) for s in grams]  # PEFT keeps l as (d, 1)
    expected = (g[0] * thetas[0] + g[1] * thetas[1]) / (g[0] + g[1])
    base = open_checkpoint(ia3["base"])
    key = "encoder.layer.0.attention.self.key.weight"
    torch.testing.assert_close(merged.state[key].double(), expected * base.get(key).double(),
                               atol=1e-6, rtol=1e-5)


def test_gram_of_a_key_vector_is_the_mean_square_of_the_base_key_output(ia3):
    # Layer 0's key sees the embeddings, which no (IA)³ vector touches: the plain base model's key
    # output on the same examples must give the module-space statistic.
    module = ia3["sst2-a"]
    values = stats_module.statistics(module, "sst2", ("gram",), STATS, space="module")
    spec = ml.get_task("sst2")
    model = load(resolve(ia3["base"]), spec, new_head=True, device="cpu").model.eval()
    examples = stats_module._examples(spec, load_tokenizer(resolve(module)), STATS["examples"], torch.device("cpu"))
    rows = []
    hook = model.bert.encoder.layer[0].attention.self.key.register_forward_hook(
        lambda m, args, out: rows.append(out.detach()))
    with torch.no_grad():
        for example in examples:
            rows.clear()
            model(input_ids=example["input_ids"], attention_mask=example["attention_mask"],
                  token_type_ids=example.get("token_type_ids"))
            example["h"] = rows[0][example["attention_mask"].bool()]
    hook.remove()
    h = torch.cat([e["h"] for e in examples]).double()
    statistic = values["encoder.layer.0.attention.self.key.ia3_l"]
    torch.testing.assert_close(statistic["gram"].double(), (h ** 2).mean(0), rtol=1e-5, atol=1e-7)
    assert float(statistic["gram_count"]) == h.shape[0]


def test_block_fisher_diagonal_is_the_diagonal_fisher(ia3):
    module = ia3["cola"]
    options = {**STATS, "gradients": "per_example"}
    blocks = stats_module.statistics(module, "cola", ("block_fisher",), options, space="module")
    diagonal = stats_module.statistics(module, "cola", ("fisher",), options, space="module")
    assert blocks and all(name.endswith("ia3_l") for name in blocks)
    for name, kinds in blocks.items():
        block = kinds["block_fisher"]
        assert block.shape == (block.shape[0], block.shape[0])
        torch.testing.assert_close(block, block.T)
        torch.testing.assert_close(torch.diagonal(block), diagonal[name]["fisher"].reshape(-1), rtol=1e-4, atol=1e-9)
    assert any("classifier" in name for name in diagonal)  # the diagonal Fisher covers the head too


def test_block_fisher_conjugate_gradient_reaches_the_closed_form(ia3):
    models = [ia3["sst2-a"], ia3["cola"]]
    common = {**STATS, "objective": "block_fisher"}
    cg = ml.merge("mats", models, params={**common, "iterations": 500, "tolerance": 1e-10}, space="module")
    direct = ml.merge("mats", models, params={**common, "solver": "closed_form"}, space="module")
    _close(_encoder(cg), _encoder(direct), atol=1e-4)
    assert all(r["converged"] for r in ml.methods.mats.convergence(cg.report))
    assert set(cg.report) == set(vectors(module_checkpoint(resolve(models[0]))).names)


def test_module_space_refuses_what_it_cannot_merge(ia3):
    with pytest.raises(ml.MergeLabError, match=r"space 'module' merges \(IA\)3 scaling vectors, but the models "
                                               r"are lora modules"):
        ml.merge("average", [ia3["lora"], ia3["lora"]], space="module")
    with pytest.raises(ml.MergeLabError, match="not every checkpoint is an adapter module"):
        ml.merge("average", [ia3["sst2-a"], ia3["base"]], space="module")
    with pytest.raises(ml.MergeLabError, match="the blockwise Fisher is computed for \\(IA\\)3 scaling vectors"):
        ml.merge("mats", [ia3["sst2-a"], ia3["sst2-b"]], params={**STATS, "objective": "block_fisher"})
    with pytest.raises(ml.MergeLabError, match="K-FAC factors are for full linear layers"):
        ml.merge("mats", [ia3["sst2-a"], ia3["sst2-b"]], params={**STATS, "objective": "kfac"}, space="module")
    with pytest.raises(ml.MergeLabError, match=r"space must be one of \['weights', 'module'\]"):
        ml.MergeSpec("average", (ia3["sst2-a"], ia3["sst2-b"]), space="modules")


def test_a_module_space_merge_reruns_from_its_config(ia3, tmp_path):
    out = tmp_path / "merged"
    ml.merge("ties", [ia3["sst2-a"], ia3["sst2-b"]], params={"density": 0.5}, space="module", out=out)
    again = ml.merge_from_config(out / "merge_config.json", tmp_path / "again")
    first, second = open_checkpoint(str(out)), open_checkpoint(str(again.out))
    assert again.spec.space == "module"
    for name in first.names:
        assert torch.equal(first.get(name), second.get(name)), name


@pytest.mark.parametrize("space", ["weights", "module"])
def test_merged_modules_of_one_task_keep_their_head(ia3, tmp_path, space):
    # A merge of adapter modules of one task writes a classifier (the base's config is a bare encoder's),
    # whose head is the average of the modules' heads, and it scores as the in-memory merge does.
    models = [ia3["sst2-a"], ia3["sst2-b"]]
    out = tmp_path / space
    result = ml.merge("ties", models, params={"density": 0.5}, space=space, out=out)
    assert result.tasks == ["sst2"]
    written = open_checkpoint(str(out))
    heads = [open_checkpoint(m) for m in models]
    assert written.head.kind == "sequence" and written.task == "sst2"
    for name in ("classifier.weight", "classifier.bias"):
        torch.testing.assert_close(written.get(name), (heads[0].get(name) + heads[1].get(name)) / 2)
    score = ml.evaluate(str(out), "sst2", limit=16)
    assert score["n"] == 16 and 0.0 <= score["accuracy"] <= 1.0


@pytest.mark.parametrize("method, params", [("fisher", STATS), ("mats", {**STATS, "objective": "kfac"})])
def test_gradient_statistics_of_folded_modules(ia3, method, params):
    # A module folded into its base comes back from PEFT with every parameter frozen; its weight-space
    # Fisher and K-FAC factors still need the gradients of all of them.
    merged = ml.merge(method, [ia3["sst2-a"], ia3["cola"]], params=params)
    assert all(torch.isfinite(t).all() for t in merged.state.values())
    fisher = ml.stats.statistics(ia3["cola"], "cola", ("fisher",), STATS)
    assert "encoder.layer.0.attention.self.key.weight" in fisher


def test_cli_merges_in_module_space(ia3, tmp_path, capsys):
    from merging_core.cli import main

    out = tmp_path / "cli"
    assert main(["merge", "--method", "mats", "--models", ia3["sst2-a"], ia3["cola"], "--space", "module",
                 "--set", "objective=block_fisher", "examples=16", "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    config = json.loads((out / "merge_config.json").read_text())
    assert config["space"] == "module" and config["stats"][0]["space"] == "module"
    assert summary["tasks"] == ["cola", "sst2"] and summary["convergence"]
    assert all(row["parameter"].endswith("ia3_l") for row in summary["convergence"])


def test_the_merge_tab_says_the_vectors_were_merged(ia3):
    from views.merge_tab import _settings

    result = ml.merge("ties", [ia3["sst2-a"], ia3["cola"]], params={"density": 0.5}, space="module")
    assert "(IA)3 vectors merged, then folded" in _settings(result.config)
    weights = ml.merge("ties", [ia3["sst2-a"], ia3["cola"]], params={"density": 0.5})
    assert "(IA)3" not in _settings(weights.config)
