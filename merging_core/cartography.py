"""Data maps: each training example's confidence, variability and correctness during fine-tuning.

Swayamdipta et al. 2020, "Dataset Cartography: Mapping and Diagnosing Datasets with Training
Dynamics" (arXiv:2009.10795), Sec. 2: over E records of a run, an example's *confidence* is the mean
probability of its gold label, μ_i = 1/E Σ_e p_θ(e)(y_i | x_i); its *variability* is the standard
deviation of that probability across the records, σ_i = sqrt(1/E Σ_e (p_θ(e)(y_i | x_i) − μ_i)²); its
*correctness* is the share of records at which the model's argmax is the gold label. Examples of high
variability are *ambiguous*, of low confidence and low variability *hard to learn*, of high confidence
*easy to learn*.

**What is recorded.** The paper records every training example at the end of every epoch. A MergeLab
run may be shorter than an epoch (the demo runs see a few thousand of SST-2's 67k examples), so
`train(..., TrainConfig(cartography=N))` records a fixed subset: the first N examples of the run's
training data (its partition), scored in eval mode (no dropout) at every `cartography_every` steps and
at the last step. The default interval is one epoch of the training data when the run lasts at least
two epochs (the paper's setting), else an eighth of the run. Recording draws no random numbers, so the
trained weights are the same with or without it. The records are saved beside the checkpoint as
`cartography.json` (dataset indices of the examples in the task's train split, the steps, the gold
probabilities and correctness per record).

**Relating it to a path.** `relate` joins a data map with the knowledge summary of a curve scored on
the same training examples (`merging_core.knowledge`; a curve with `datamap=` scores exactly the map's
examples): are the examples forgotten along the path the ambiguous (high variability) or the hard (low
confidence) ones? It compares their means with those of the examples kept all along, and gives the
Spearman rank correlation of the point of first loss with confidence and variability.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import partition
from .encode import encode
from .errors import MergeLabError
from .evaluation import Evaluator
from .models import resolve
from .tasks import TaskSpec

FILE = "cartography.json"
MAX_EXAMPLES = 5000  # examples one run records (each record is one forward pass over them)
RECORDS = 8  # records of a run shorter than two epochs


@dataclass
class DataMap:
    """The records of one run: `probs[e, i]` is the gold probability of example `indices[i]` (of the task's
    train split) at record e (after step `steps[e]`); `correct[e, i]` whether its argmax was the gold label."""

    task: str
    indices: list[int]
    steps: list[int]
    probs: np.ndarray  # (records, examples) float
    correct: np.ndarray  # (records, examples) bool
    split: str = "train"
    extra: dict = field(default_factory=dict)

    @property
    def confidence(self) -> np.ndarray:
        """μ_i: the mean gold probability over the records."""
        return self.probs.mean(0)

    @property
    def variability(self) -> np.ndarray:
        """σ_i: the (population) standard deviation of the gold probability over the records."""
        return self.probs.std(0)

    @property
    def correctness(self) -> np.ndarray:
        """The share of records at which the example was answered correctly."""
        return self.correct.mean(0)

    def regions(self) -> np.ndarray:
        """Per example: "ambiguous" (the third of highest variability), else "hard" (the third of lowest
        confidence) or "easy" (the third of highest confidence), else "middle" (the paper's Sec. 2.1
        regions, cut at terciles)."""
        conf, var = self.confidence, self.variability
        out = np.full(len(conf), "middle", dtype=object)
        out[conf >= np.quantile(conf, 2 / 3)] = "easy"
        out[conf <= np.quantile(conf, 1 / 3)] = "hard"
        out[var >= np.quantile(var, 2 / 3)] = "ambiguous"
        return out

    def table(self) -> list[dict]:
        """One row per example: index, confidence, variability, correctness, region."""
        return [{"index": int(i), "confidence": float(c), "variability": float(v), "correctness": float(k),
                 "region": str(r)}
                for i, c, v, k, r in zip(self.indices, self.confidence, self.variability, self.correctness,
                                         self.regions())]

    def to_dict(self) -> dict:
        return {"format": 1, "task": self.task, "split": self.split, "indices": list(map(int, self.indices)),
                "steps": list(map(int, self.steps)), "probs": np.round(self.probs, 6).tolist(),
                "correct": self.correct.astype(int).tolist(), **self.extra}

    @classmethod
    def from_dict(cls, data: dict) -> DataMap:
        probs = np.asarray(data["probs"], dtype=np.float64).reshape(len(data["steps"]), len(data["indices"]))
        correct = np.asarray(data["correct"], dtype=bool).reshape(probs.shape)
        extra = {k: v for k, v in data.items() if k not in ("format", "task", "split", "indices", "steps", "probs",
                                                            "correct")}
        return cls(data["task"], list(data["indices"]), list(data["steps"]), probs, correct, data.get("split", "train"),
                   extra)


def read(model: str | Path) -> DataMap | None:
    """The data map saved beside a checkpoint (a zoo name or folder), or None when it has none."""
    ref = resolve(str(model))
    path = ref.path / FILE if ref.path is not None else None
    if path is None or not path.is_file():
        return None
    try:
        return DataMap.from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as exc:
        raise MergeLabError(f"the data map of {ref.spec} is damaged ({type(exc).__name__}); retrain with cartography "
                            "to record it again", param="datamap") from None


def require(model: str | Path) -> DataMap:
    """The data map of `model`, or a clear error when the checkpoint has none."""
    found = read(model)
    if found is None:
        raise MergeLabError(f"{model} has no data map; fine-tune it with cartography on (train --cartography N)",
                            param="datamap")
    return found


def interval(steps: int, examples: int, batch_size: int, every: int | None) -> int:
    """Steps between records: `every` if given; else one epoch of `examples` when the run lasts at least two
    epochs, else an eighth of the run."""
    if every is not None:
        if every < 1:
            raise MergeLabError(f"cartography_every must be at least 1 step, got {every}", param="cartography_every")
        return int(every)
    epoch = math.ceil(examples / batch_size)
    if steps >= 2 * epoch:
        return epoch
    return max(1, steps // RECORDS)


class Recorder:
    """Records the gold probabilities of a fixed subset of a run's training examples at given steps."""

    def __init__(self, spec: TaskSpec, tokenizer, examples: int, *, steps: int, batch_size: int,
                 every: int | None = None, part: str = "iid", device=None, max_length: int = 128):
        if spec.kind != "classification":
            raise MergeLabError(f"data maps need a classification task (a gold label per example), not {spec.name} "
                                f"({spec.kind})", param="cartography")
        if not 1 <= examples <= MAX_EXAMPLES:
            raise MergeLabError(f"cartography records 1 to {MAX_EXAMPLES} training examples, got {examples}",
                                param="cartography")
        self.spec, self.steps = spec, steps
        full = encode(spec, "train", tokenizer, max_length)
        # the run's training data (its partition), in the order training reads it; the first N are recorded
        pool = partition.indices(partition.parse(part), spec, full.labels)
        self.indices = pool[:examples].tolist()
        self.every = interval(steps, len(pool), batch_size, every)
        self.evaluator = Evaluator(spec, tokenizer, "train", indices=self.indices, device=device,
                                   max_length=max_length)
        self.labels = self.evaluator.encoded.labels
        self.records: list[int] = []
        self.probs: list[np.ndarray] = []
        self.correct: list[np.ndarray] = []

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.steps

    def record(self, model: torch.nn.Module, step: int) -> None:
        """Score the examples with `model` (put in eval mode; the caller restores train mode)."""
        self.evaluator(model)
        logits = self.evaluator.last_logits
        probs = torch.softmax(logits.double(), -1)
        self.probs.append(probs[torch.arange(len(self.labels)), self.labels].numpy())
        self.correct.append((logits.argmax(-1) == self.labels).numpy())
        self.records.append(step)

    def datamap(self) -> DataMap:
        return DataMap(self.spec.name, self.indices, self.records, np.stack(self.probs), np.stack(self.correct),
                       extra={"every": self.every})

    def save(self, folder: Path) -> dict:
        """Write `cartography.json` into `folder`; returns what `mergelab.json` notes about it."""
        (folder / FILE).write_text(json.dumps(self.datamap().to_dict()) + "\n")
        return {"file": FILE, "examples": len(self.indices), "records": len(self.records), "every": self.every}


def _spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    from scipy.stats import spearmanr  # third-party, read only when a relation is asked for

    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    value = float(spearmanr(x, y).statistic)
    return None if math.isnan(value) else value


def _means(group: np.ndarray, conf: np.ndarray, var: np.ndarray, corr: np.ndarray) -> dict:
    if not len(group):
        return {"n": 0, "confidence": None, "variability": None, "correctness": None}
    return {"n": len(group), "confidence": float(conf[group].mean()), "variability": float(var[group].mean()),
            "correctness": float(corr[group].mean())}


def relate(datamap: DataMap, correct: np.ndarray | Sequence[Sequence[bool]], indices: Sequence[int],
           barrier: int, *, ends: tuple[Sequence[bool], Sequence[bool]] | None = None) -> dict:
    """Forgetting along a path against the data map, on the examples of both.

    `correct` is a curve's (examples x points) knowledge matrix whose row r is example `indices[r]` of the
    data map's task (train split), `barrier` its barrier column, `ends` the end models' own correctness
    (default: the first and last columns). Among the examples right at both ends: "forgotten" (wrong at
    some point), "kept" (right all along) and "forgotten_at_barrier"; the mean confidence, variability and
    correctness of each, and of "lost_to_b" (right at A, wrong at B: what the path gives up by its end);
    the share of each region (ambiguous, hard, easy, middle) in each group; and the
    Spearman correlation, over the forgotten examples, of the point of first loss with confidence and
    variability (positive with confidence: the less confident examples are lost first), and over all of
    them, of the number of points forgotten with confidence and variability."""
    matrix = np.asarray(correct, dtype=bool)
    position = {int(i): k for k, i in enumerate(datamap.indices)}
    rows = np.array([r for r, i in enumerate(indices) if int(i) in position], dtype=int)
    if not len(rows):
        return {"shared": 0, "note": "no example of the path's view is in the data map"}
    at = np.array([position[int(indices[r])] for r in rows])
    conf, var, corr = datamap.confidence[at], datamap.variability[at], datamap.correctness[at]
    regions = datamap.regions()[at]
    sub = matrix[rows]
    a_right, b_right = ((sub[:, 0], sub[:, -1]) if ends is None
                        else (np.asarray(ends[0], dtype=bool)[rows], np.asarray(ends[1], dtype=bool)[rows]))
    known = a_right & b_right
    depth = (~sub & known[:, None]).sum(1)
    # first loss: the first column wrong after a right one
    lost = sub[:, :-1] & ~sub[:, 1:]
    first = np.where(lost.any(1), lost.argmax(1) + 1, -1)
    forgotten = np.flatnonzero(known & (depth > 0))
    kept = np.flatnonzero(known & (depth == 0))
    at_barrier = np.flatnonzero(known & ~sub[:, barrier])
    lost_to_b = np.flatnonzero(a_right & ~b_right)  # A's knowledge the path gives up by its end
    share = {name: {region: float(np.mean(regions[group] == region)) if len(group) else None
                    for region in ("ambiguous", "hard", "easy", "middle")}
             for name, group in (("forgotten", forgotten), ("forgotten_at_barrier", at_barrier), ("kept", kept),
                                 ("lost_to_b", lost_to_b), ("all", np.arange(len(rows))))}
    lost_first = forgotten[first[forgotten] >= 0]
    both = np.flatnonzero(known)
    return {"shared": len(rows), "known_both": int(known.sum()),
            "forgotten": _means(forgotten, conf, var, corr), "kept": _means(kept, conf, var, corr),
            "forgotten_at_barrier": _means(at_barrier, conf, var, corr), "lost_to_b": _means(lost_to_b, conf, var, corr),
            "all": _means(np.arange(len(rows)), conf, var, corr),
            "regions": share,
            "spearman_first_loss_confidence": _spearman(first[lost_first], conf[lost_first]),
            "spearman_first_loss_variability": _spearman(first[lost_first], var[lost_first]),
            "spearman_first_loss_confidence_lost_to_b": _spearman(first[lost_to_b], conf[lost_to_b]),
            "spearman_first_loss_variability_lost_to_b": _spearman(first[lost_to_b], var[lost_to_b]),
            "spearman_points_forgotten_confidence": _spearman(depth[both], conf[both]),
            "spearman_points_forgotten_variability": _spearman(depth[both], var[both])}
