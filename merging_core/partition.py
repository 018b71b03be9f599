"""Data partitions: which training examples one model of a family sees.

- `iid`: the whole training split.
- `iid:K/N`: shard K (1-based) of N disjoint random shards of equal size.
- `label-skew:K/N[@P]`: shard K of N disjoint shards where shard k draws a share P (default 0.8) of
  its examples from its "own" labels (label l belongs to shard l mod N; for regression, the k-th
  quantile bin of the score) and the rest from the others. Models trained on different shards are
  the "different data splits" of the mode-connectivity and merging papers.

Shards are cut with a fixed seed independent of the training seed, so shard K is the same data
whatever seed trains on it, and the N shards of a partition never overlap.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from .errors import MergeLabError
from .tasks import TaskSpec

PARTITION_SEED = 20240101
_SYNTAX = re.compile(r"^(iid|label-skew)(?::(\d+)/(\d+)(?:@([0-9.]+))?)?$")


@dataclass(frozen=True)
class Partition:
    kind: str  # "iid" | "label-skew"
    shard: int = 1  # 1-based
    shards: int = 1
    skew: float = 0.8

    def __str__(self) -> str:
        if self.shards == 1:
            return self.kind
        return f"{self.kind}:{self.shard}/{self.shards}" + (f"@{self.skew:g}" if self.kind == "label-skew" else "")


def parse(text: str) -> Partition:
    match = _SYNTAX.match(text.strip())
    if not match:
        raise MergeLabError(f"partition {text!r} is not understood; use iid, iid:K/N or label-skew:K/N[@P]")
    kind, shard, shards, skew = match.groups()
    part = Partition(kind, int(shard or 1), int(shards or 1), float(skew) if skew else 0.8)
    if not 1 <= part.shard <= part.shards:
        raise MergeLabError(f"partition {text!r}: shard K must be between 1 and N")
    if kind == "label-skew" and (part.shards < 2 or not 0 < part.skew <= 1):
        raise MergeLabError(f"partition {text!r}: label-skew needs N >= 2 shards and 0 < P <= 1")
    return part


def indices(part: Partition, spec: TaskSpec, labels: torch.Tensor) -> torch.Tensor:
    """Indices of the training examples in `part` (labels: one per example)."""
    n = len(labels)
    if part.shards == 1:
        return torch.arange(n)
    rng = np.random.default_rng(PARTITION_SEED)
    if part.kind == "iid":
        return torch.from_numpy(np.sort(np.array_split(rng.permutation(n), part.shards)[part.shard - 1]))
    if spec.kind in ("token", "mlm"):
        raise MergeLabError(f"label-skew partitions need one label per example; task {spec.name} has none "
                            "(use iid:K/N)")
    values = labels.numpy()
    if spec.kind == "regression":  # quantile bins of the score stand in for labels
        edges = np.quantile(values, np.linspace(0, 1, part.shards + 1)[1:-1])
        home = np.searchsorted(edges, values, side="right")
    else:
        home = values % part.shards
    stays = rng.random(n) < part.skew
    # An example that leaves its home shard goes to one of the other N-1 shards uniformly.
    elsewhere = (home + rng.integers(1, part.shards, size=n)) % part.shards
    shard = np.where(stays, home, elsewhere)
    return torch.from_numpy(np.flatnonzero(shard == part.shard - 1))


def of_model(metadata: dict) -> Partition:
    """The partition a checkpoint was trained on, from its recorded provenance (`iid` when none)."""
    return parse(str(metadata.get("partition") or "iid"))


def training_indices(part: Partition, spec: TaskSpec, n: int, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the `n` training examples that training on `part` uses. `labels`: one per example;
    None for token and MLM data, which have one label per token (only `iid` shards apply to them)."""
    return indices(part, spec, torch.zeros(n, dtype=torch.long) if labels is None else labels)
