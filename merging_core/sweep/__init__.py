"""Sweeps and searches over a merge method's settings, run as Ray Tune experiments.

    spec = SweepSpec("ties", ("sst2-s0", "sst2-s1"), base="minilm",
                     space=("lambda=0.2:1.0:5", "density=0.1:0.9:5"), dev_size=200)
    run = sweep(spec)             # Ray starts here, or attaches to RAY_ADDRESS
    for row in run: print(row)    # each trial's point and scores, as it finishes
    run.summary()["best"]; materialize(run.folder, "merges/best")

`space` grammar and per-layer dimensions: `space`; the request object: `spec`; one trial: `trial`;
Ray and the experiment's folder: `runner`.
"""

from .runner import Sweep, connect, holdout, materialize, open_sweep, sweep, sweeps_dir
from .space import Dimension, parse_dimension
from .spec import ALGORITHMS, SweepSpec

__all__ = ["ALGORITHMS", "Dimension", "Sweep", "SweepSpec", "connect", "holdout", "materialize", "open_sweep",
           "parse_dimension", "sweep", "sweeps_dir"]
