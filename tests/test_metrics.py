"""Metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from merging_core import metrics


def test_classification_binary():
    labels = np.array([1, 1, 0, 0, 1])
    predictions = np.array([1, 0, 0, 1, 1])
    values = metrics.classification_metrics(predictions, labels, 2)
    assert values["accuracy"] == pytest.approx(3 / 5)
    # TP=2, FP=1, FN=1: precision 2/3, recall 2/3
    assert values["f1"] == pytest.approx(2 / 3)
    # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (2*1 - 1*1) / sqrt(3*3*2*2)
    assert values["mcc"] == pytest.approx(1 / 6)


def test_classification_multiclass_has_no_binary_f1():
    values = metrics.classification_metrics(np.array([0, 1, 2, 5]), np.array([0, 1, 2, 3]), 6)
    assert "f1" not in values and values["accuracy"] == 0.75


def test_regression_correlations():
    labels = np.array([0.0, 1.0, 2.0, 3.0])
    assert metrics.regression_metrics(labels * 2 + 1, labels) == pytest.approx({"pearson": 1.0, "spearman": 1.0})
    squashed = metrics.regression_metrics(np.array([0.0, 1.0, 8.0, 27.0]), labels)
    assert squashed["spearman"] == pytest.approx(1.0) and squashed["pearson"] < 0.99
    assert metrics.regression_metrics(np.zeros(4), labels) == {"pearson": 0.0, "spearman": 0.0}


def test_span_metrics_count_whole_spans():
    gold = [["B-PER", "I-PER", "O", "B-LOC"]]
    half = [["B-PER", "O", "O", "B-LOC"]]  # the person span is cut short: it does not count
    values = metrics.span_metrics(half, gold)
    assert values["precision"] == pytest.approx(1 / 2)  # spans found: PER(0..0) wrong, LOC right
    assert values["recall"] == pytest.approx(1 / 2)
    assert values["token_accuracy"] == pytest.approx(3 / 4)
    assert metrics.span_metrics(gold, gold)["f1"] == 1.0


def test_mlm_perplexity():
    assert metrics.mlm_metrics(math.log(20.0))["perplexity"] == pytest.approx(20.0)
