"""The batched evaluator against a naive one-example-at-a-time computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from merging_core import Evaluator, evaluate, models, tasks
from merging_core.errors import MergeLabError


def _naive_logits(model, enc, n):
    rows = []
    with torch.no_grad():
        for i in range(n):
            batch = enc.batch(torch.tensor([i]), 0)
            batch.pop("labels")
            rows.append(model(**batch).logits[0])
    return torch.stack(rows) if rows[0].dim() == 1 else rows


@pytest.mark.parametrize("task", ["sst2", "stsb"])
def test_sequence_scores_match_naive_loop(pico, task):
    spec = tasks.get_task(task)
    loaded = models.load(str(pico(task)), spec, device="cpu")
    evaluator = Evaluator(spec, loaded.tokenizer, "dev", limit=40, batch_size=7, device="cpu")
    result = evaluator(loaded.model)
    logits = _naive_logits(loaded.model, evaluator.encoded, 40)
    labels = evaluator.encoded.labels
    assert result["n"] == 40 and result["task"] == task
    if task == "sst2":
        assert result["accuracy"] == pytest.approx((logits.argmax(-1) == labels).float().mean().item())
        assert result["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-4)
    else:
        predictions = logits.squeeze(-1).numpy()
        assert result["pearson"] == pytest.approx(np.corrcoef(predictions, labels.numpy())[0, 1], abs=1e-4)
        assert result["loss"] == pytest.approx(F.mse_loss(logits.squeeze(-1), labels).item(), rel=1e-4)


def test_batch_size_does_not_change_scores(pico):
    spec = tasks.get_task("conll2003")
    loaded = models.load(str(pico("conll2003")), spec, device="cpu")
    one = Evaluator(spec, loaded.tokenizer, limit=30, batch_size=1, device="cpu")(loaded.model)
    many = Evaluator(spec, loaded.tokenizer, limit=30, batch_size=16, device="cpu")(loaded.model)
    assert one.keys() == many.keys()
    for key in ("f1", "precision", "recall", "token_accuracy", "loss"):
        assert one[key] == pytest.approx(many[key], abs=1e-5), key


def test_token_predictions_follow_a_perfect_model(pico, tokenizer, monkeypatch):
    """A model that outputs the gold tag must score span F1 = 1 (checks the order bookkeeping)."""
    spec = tasks.get_task("conll2003")
    evaluator = Evaluator(spec, tokenizer, limit=25, batch_size=4, device="cpu")

    class Oracle(torch.nn.Module):
        def forward(self, input_ids, attention_mask, token_type_ids=None):
            for batch in evaluator.batches:  # find this batch's labels
                if batch["input_ids"].shape == input_ids.shape and torch.equal(batch["input_ids"], input_ids):
                    labels = batch["labels"].clamp(min=0)
            return type("Out", (), {"logits": F.one_hot(labels, spec.num_labels).float()})()

    result = evaluator(Oracle())
    assert result["f1"] == 1.0 and result["token_accuracy"] == 1.0


def test_mlm_scores_are_reproducible(pico):
    spec = tasks.get_task("wikitext2")
    loaded = models.load(str(pico("wikitext2")), spec, device="cpu")
    first = evaluate(loaded, spec, limit=12)
    second = Evaluator(spec, loaded.tokenizer, limit=12, batch_size=5, device="cpu")(loaded.model)
    assert first["loss"] == pytest.approx(second["loss"], rel=1e-5) and first["masked_tokens"] == second["masked_tokens"]
    # A random pico model is close to uniform over the vocabulary: loss near log(30522) = 10.33.
    assert 9.5 < first["loss"] < 11.5 and first["perplexity"] == pytest.approx(np.exp(first["loss"]), rel=1e-6)


def test_evaluate_checks_the_head_of_a_loaded_model(pico):
    loaded = models.load(str(pico("sst2")), tasks.get_task("sst2"), device="cpu")
    with pytest.raises(MergeLabError, match="needs a token head"):
        evaluate(loaded, "conll2003", limit=4)


def test_evaluate_many_reports_unfit_tasks_per_row(pico):
    from merging_core.evaluation import evaluate_many

    rows = evaluate_many(str(pico("sst2")), ["sst2", "emotion"], limit=8)
    assert rows[0]["n"] == 8 and "accuracy" in rows[0]
    assert "6" in rows[1]["error"] and rows[1]["task"] == "emotion"
    with pytest.raises(MergeLabError, match="does not exist"):
        evaluate_many("./missing-model", ["sst2"])
