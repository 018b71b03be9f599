"""Same task, different data, and NER merges (Jin et al. 2023, RegMean, arXiv:2212.09849, pairwise tables):
the pairwise table of `compare_subsets` against merges run and scored one by one; token-classification
merges, ensembles and greedy merging scored by span F1. Pico models only (seconds)."""

from __future__ import annotations

import json
import shutil
from itertools import combinations

import pytest
import torch

import merging_core as ml
from merging_core.compare import Ensemble, compare_subsets
from merging_core.evaluation import Evaluator, headline

LIMIT = 24  # dev examples per task: every score below is compared with an independent computation


def _score(model: str, task: str) -> float:
    return headline(ml.evaluate(model, task, limit=LIMIT))[1]


def _merged_score(tmp_path, method: str, models: list[str], task: str) -> float:
    """Merge to a folder and score the folder: the path a user takes, independent of `compare`'s
    in-memory merges and its shared evaluators."""
    out = tmp_path / f"{method}-{'-'.join(str(abs(hash(m)) % 10_000) for m in models)}"
    if not out.exists():
        ml.merge(ml.MergeSpec(method, tuple(models)), out=out)
    return _score(str(out), task)


def _ensemble_accuracy(models: list[str], task: str) -> float:
    """Accuracy of the mean logits of `models`, computed by hand over an evaluator's batches."""
    loaded = [ml.load(m, ml.get_task(task)).model.eval() for m in models]
    evaluator = Evaluator(task, ml.load(models[0], ml.get_task(task)).tokenizer, "dev", LIMIT)
    correct = 0
    with torch.no_grad():
        for batch in evaluator.batches:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            logits = torch.stack([m(**inputs).logits for m in loaded]).mean(0)
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
    return correct / evaluator.n


def test_pairwise_table_is_the_mean_of_merges_run_one_by_one(pico, tmp_path, capsys):
    models = [str(pico("sst2", seed)) for seed in (0, 1, 2)]
    reference = models[0]  # stands in for the model trained on the union of the partitions (one task)
    rows = list(compare_subsets(models, ["average", "task_arithmetic"], base=str(pico(None)),
                                multitask=reference, limit=LIMIT))
    pairs = list(combinations(models, 2))
    per_pair = [r for r in rows if isinstance(r["subset"], list)]
    summary = {r["model"]: r for r in rows if not isinstance(r["subset"], list)}
    assert len(per_pair) == 3 * 5 and [r["subset"] for r in per_pair[::5]] == [list(p) for p in pairs]
    assert set(summary) == {"individual models (mean)", "ensemble (logits)", reference, "average",
                            "task_arithmetic"} and all(r["subsets"] == 3 for r in summary.values())

    own = {m: _score(m, "sst2") for m in models}
    expected: dict[str, list[float]] = {label: [] for label in summary}
    for pair in pairs:
        got = {r["model"]: r["sst2"] for r in per_pair if r["subset"] == list(pair)}
        want = {"individual models (mean)": (own[pair[0]] + own[pair[1]]) / 2,
                "ensemble (logits)": _ensemble_accuracy(list(pair), "sst2"),
                reference: _score(reference, "sst2"),
                "average": _merged_score(tmp_path, "average", list(pair), "sst2")}
        out = tmp_path / f"ta-{pair[0][-1]}{pair[1][-1]}"
        ml.merge(ml.MergeSpec("task_arithmetic", pair, base=str(pico(None)), params={"lambda": 0.3}), out=out)
        want["task_arithmetic"] = _score(str(out), "sst2")
        assert got == pytest.approx(want, abs=1e-9), pair
        for label, value in want.items():
            expected[label].append(value)
    for label, values in expected.items():  # one task: the task column and the mean are the same average
        assert summary[label]["sst2"] == pytest.approx(sum(values) / 3, abs=1e-9), label
        assert summary[label]["mean"] == pytest.approx(sum(values) / 3, abs=1e-9), label

    # All together (subsets of 3): one subset, no summary rows; its merge is the merge of the three.
    from merging_core.cli import main

    assert main(["compare", "--models", *models, "--methods", "average", "--subsets", "3", "--limit", str(LIMIT),
                 "--json"]) == 0  # through the CLI: one JSON line per row
    together = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["model"] for r in together] == ["individual models (mean)", "ensemble (logits)", "average"]
    assert together[0]["sst2"] == pytest.approx(sum(own.values()) / 3, abs=1e-9)
    assert together[2]["sst2"] == pytest.approx(_merged_score(tmp_path, "average", models, "sst2"), abs=1e-9)
    assert main(["compare", "--models", *models, "--methods", "average", "--subsets", "4"]) == 2
    assert "--subsets" in capsys.readouterr().err  # a size out of range names its flag


def test_ner_merge_of_a_model_with_itself_and_one_model_ensembles(pico):
    ner = str(pico("conll2003", 0))
    alone = ml.evaluate(ner, "conll2003", limit=LIMIT)
    assert alone["f1"] > 0  # a random pico tagger still opens some right spans: the check below is not 0 == 0
    rows = {r["kind"]: r for r in ml.compare([ner, ner], ["average"], limit=LIMIT)}
    # The merge of a model with itself (heads merged: one label set) and the ensemble of one model twice
    # both score exactly the model's span F1.
    assert rows["merge"]["conll2003"] == rows["ensemble"]["conll2003"] == rows["individual"]["conll2003"] == \
        alone["f1"]

    # A token-classification ensemble of one model is the model, token by token; of two, the mean per token.
    other = str(pico("conll2003", 1))
    a, b = (ml.load(m, ml.get_task("conll2003")).model.eval() for m in (ner, other))
    evaluator = Evaluator("conll2003", ml.load(ner, ml.get_task("conll2003")).tokenizer, "dev", 8)
    batch = {k: v for k, v in evaluator.batches[0].items() if k != "labels"}
    with torch.no_grad():
        assert torch.equal(Ensemble([a])(**batch).logits, a(**batch).logits)
        assert torch.allclose(Ensemble([a, b])(**batch).logits, (a(**batch).logits + b(**batch).logits) / 2)
        probabilities = (a(**batch).logits.softmax(-1) + b(**batch).logits.softmax(-1)) / 2
        assert torch.allclose(Ensemble([a, b], "probabilities")(**batch).logits.exp(), probabilities, atol=1e-6)
    assert evaluator(Ensemble([a])) == evaluator(a)


def test_greedy_and_mixed_heads_on_ner_models(pico, tmp_path):
    models = [str(pico("conll2003", seed)) for seed in (0, 1, 2)]
    rows = list(ml.greedy(models, "average", limit=LIMIT))
    own = {m: _score(m, "conll2003") for m in models}
    order = sorted(models, key=lambda m: -own[m])
    assert [r["models"] for r in rows] == [order[:2], order]
    for row in rows:  # each greedy step is the merge of its models, scored by span F1
        assert row["conll2003"] == pytest.approx(_merged_score(tmp_path, "average", row["models"], "conll2003"),
                                                 abs=1e-9)

    # A sequence model with a token model: label sets differ, so each task keeps its own head (as for two
    # sequence tasks); each is scored on the merged encoder with its head. (The sequence model comes
    # first: its pooler, which a token model lacks, is then kept from it.)
    sst2 = str(pico("sst2", 0))
    (merged,) = [r for r in ml.compare([sst2, models[0]], ["average"], limit=LIMIT) if r["kind"] == "merge"]
    for task in ("conll2003", "sst2"):
        assert merged[task] == pytest.approx(_merged_score(tmp_path, "average", [sst2, models[0]], task), abs=1e-9)


def test_own_data_statistics_come_from_the_models_partition(pico, tmp_path):
    """`compare --stats-data own`: a model's statistics on the partition it was trained on. For a model of
    the whole train split they are the statistics `merge` computes from the task; for a label-skewed
    shard they are computed on that shard's examples only."""
    from merging_core import stats
    from merging_core.compare import own_data_statistics

    options = {"examples": 8}
    whole = str(pico("sst2", 0))
    values, record = stats.load_stats(own_data_statistics(whole, ("gram",), options))
    expected = stats.statistics(whole, "sst2", ("gram",), options)
    assert record["partition"] == "iid" and set(values) == set(expected)
    for name in expected:
        assert torch.equal(values[name]["gram"], expected[name]["gram"]), name

    shards = []
    for k in (1, 2):  # the same weights, trained (say) on each label-skewed half
        folder = tmp_path / f"shard{k}"
        shutil.copytree(whole, folder)
        (folder / "mergelab.json").write_text(json.dumps({"task": "sst2", "partition": f"label-skew:{k}/2"}))
        shards.append(stats.load_stats(own_data_statistics(str(folder), ("gram",), options)))
    name = next(n for n in expected if n.endswith("query.weight"))
    assert [rec["partition"] for _, rec in shards] == ["label-skew:1/2@0.8", "label-skew:2/2@0.8"]
    assert not torch.equal(shards[0][0][name]["gram"], shards[1][0][name]["gram"])  # other examples
    merged = ml.merge(ml.MergeSpec("regmean", (whole, whole), params=options,
                                   stats_files=tuple(str(own_data_statistics(m, ("gram",), options))
                                                     for m in (str(tmp_path / "shard1"), str(tmp_path / "shard2")))))
    assert torch.allclose(merged.state[name], ml.open_checkpoint(whole).get(name), atol=1e-5)  # same weights


def test_own_data_fisher_equals_the_task_fisher_for_a_model_of_the_whole_split(pico):
    """`--stats-data own` with Fisher: for a model trained on the whole train split the diagonal Fisher on
    "its own data" is the one `merge` computes from the task (same examples, same estimator)."""
    from merging_core import stats
    from merging_core.compare import own_data_statistics

    options = {"examples": 6, "fisher_examples": 6}
    whole = str(pico("sst2", 0))
    values, record = stats.load_stats(own_data_statistics(whole, ("fisher",), options))
    expected = stats.statistics(whole, "sst2", ("fisher",), options)
    assert record["partition"] == "iid" and set(values) == set(expected)
    for name in expected:
        assert torch.allclose(values[name]["fisher"], expected[name]["fisher"], rtol=1e-5, atol=1e-12), name
