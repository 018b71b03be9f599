"""Task metrics, from scikit-learn, scipy and seqeval (no hub-fetched metric scripts).

- accuracy, binary F1 (positive class 1, as GLUE scores MRPC and QQP), macro F1;
- Matthews correlation (CoLA);
- Pearson and Spearman correlation (STS-B);
- span-level precision / recall / F1 with seqeval's default (conlleval) rules, under which an I- tag
  after O opens a span, as a few do in the CoNLL-2003 files; plus token accuracy;
- language-model loss and its perplexity: MLM (mean cross-entropy over masked tokens) and causal LM
  (mean cross-entropy of each next token), both through `mlm_metrics`.

All functions return plain floats so results serialise to JSON as they are.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

# scikit-learn, scipy and seqeval are imported where they are used: together they take seconds to
# import, which every CLI call (a merge, a listing) would otherwise pay.
from .tasks import TaskSpec


def classification_metrics(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    values = {
        "accuracy": float(accuracy_score(labels, predictions)),
        "mcc": float(matthews_corrcoef(labels, predictions)),
        "macro_f1": float(f1_score(labels, predictions, average="macro", zero_division=0)),
    }
    if num_classes == 2:
        values["f1"] = float(f1_score(labels, predictions, average="binary", pos_label=1, zero_division=0))
    return values


def regression_metrics(predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    if np.ptp(predictions) == 0 or np.ptp(labels) == 0:
        return {"pearson": 0.0, "spearman": 0.0}  # a constant prediction carries no correlation
    from scipy.stats import pearsonr, spearmanr

    return {"pearson": float(pearsonr(predictions, labels)[0]), "spearman": float(spearmanr(predictions, labels)[0])}


def span_metrics(predicted: Sequence[Sequence[str]], gold: Sequence[Sequence[str]]) -> dict[str, float]:
    from seqeval.metrics import f1_score as span_f1
    from seqeval.metrics import precision_score as span_precision
    from seqeval.metrics import recall_score as span_recall

    tokens = sum(len(g) for g in gold)
    correct = sum(p == g for ps, gs in zip(predicted, gold) for p, g in zip(ps, gs))
    return {
        "f1": float(span_f1(gold, predicted, zero_division=0)),
        "precision": float(span_precision(gold, predicted, zero_division=0)),
        "recall": float(span_recall(gold, predicted, zero_division=0)),
        "token_accuracy": correct / max(tokens, 1),
    }


def mlm_metrics(loss: float) -> dict[str, float]:
    """Loss and perplexity of a language model on a text task (masked-LM or causal-LM loss alike)."""
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


# A language model's score dict says which loss it holds by the tokens it counted (`evaluation`): masked
# tokens for a masked LM, predicted next tokens for a causal LM. Tables and plots name the loss by it.
LM_LOSSES = {"masked_tokens": "MLM loss", "predicted_tokens": "next-token loss", "target_tokens": "span loss"}


def metric_label(key: str, scores: Mapping | None = None) -> str:
    """How a metric of a score dict reads in a table or a plot: a language model's "loss" says which loss
    ("next-token loss" for a causal LM, "MLM loss" for a masked LM, "span loss" for T5's span corruption);
    every other key is its own name."""
    if key == "loss" and scores:
        for counted, label in LM_LOSSES.items():
            if counted in scores:
                return label
    return key


def sequence_metrics(spec: TaskSpec, logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The task's own metrics of a sequence-level head's outputs (regression: one output per example)."""
    if spec.kind == "regression":
        values = regression_metrics(np.squeeze(logits, -1), labels)
    else:
        values = classification_metrics(logits.argmax(-1), labels, spec.num_labels)
    return select(spec, values)


def select(spec: TaskSpec, values: dict[str, float]) -> dict[str, float]:
    """Keep the task's own metrics, in its order (headline first)."""
    return {name: values[name] for name in spec.metrics if name in values}
