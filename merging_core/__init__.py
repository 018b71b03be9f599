"""MergeLab's engine: load, fine-tune, evaluate and merge transformer checkpoints.

The public API, shared by the CLI (`python -m merging_core ...`) and the Gradio app:

    import merging_core as ml
    ml.evaluate("sst2-s0", "sst2", limit=200)           # -> {"task", "split", "n", "accuracy", "loss"}
    ml.train(ml.TrainConfig(task="rte", seed=0), out="runs/rte-s0")
    ml.zoo.build("default"); ml.zoo.entries()
    ml.merge("ties", ["sst2-s0", "sst2-s1"], base="minilm", params={"density": 0.2}, out="merges/ties")
    spec = ml.MergeSpec("ties", ("sst2-s0", "sst2-s1"), base="minilm", params={"density": 0.2})
    ml.merge(spec, out="merges/ties2"); ml.merge_from_config("merges/ties2", out="merges/again")
    for row in ml.compare(["sst2-s0", "cola-s0"], ["average", "regmean"]): print(row)
    run = ml.curve("sst2-s0", "sst2-s1", "sst2", points=26)   # iterate to stream the points
    for point in run: print(point["t"], point["scores"]["sst2"]["accuracy"])
    run.summary()["barriers"]
    ml.align("scratch-s0", "scratch-s1", merge_type="ff+attn", attention="head-perm")  # B permuted into A's basis
    ml.ensemble("sst2", similarity="loss", shots=32)  # other tasks' LoRA modules, weighted, as a few-shot start
    run = ml.sweep.sweep(ml.SweepSpec("ties", ("sst2-s0", "sst2-s1"), base="minilm",
                                      space=("lambda=0.2:1.8:5", "density=0.1:0.9:5")))  # on Ray Tune
    for row in run: print(row["objective"])

Nothing here downloads at import time, and nothing here imports gradio.
"""

from ._version import __version__  # noqa: F401  (the one source of the version)

from .errors import MergeLabError  # noqa: E402

# `merge` and `compare` are both submodules and functions: importing them here, eagerly, makes the
# package attribute the function for good (a later `import merging_core.merge` does not reset it).
from .compare import compare, compare_subsets, greedy  # noqa: E402
from .merge import MergeResult, available_methods, merge, merge_from_config  # noqa: E402
from .spec import MergeSpec  # noqa: E402
from .align import align  # noqa: E402  (the package `align` and its function: see above)
from .ensemble import ensemble  # noqa: E402  (likewise)

# Everything else loads on first use (PEP 562), so `python -m merging_core merge` does not pay for
# training or metrics it does not run.
_LAZY = {
    "Evaluator": "evaluation", "evaluate": "evaluation", "METHODS": "methods", "get_method": "methods", "Loaded": "models", "load": "models", "resolve": "models",
    "save": "models", "TASKS": "tasks", "get_task": "tasks", "TrainConfig": "training", "train": "training",
    "curve": "curves", "plane": "curves", "Curve": "curves", "Plane": "curves", "CurveSpec": "curves",
    "PlaneSpec": "curves", "open_checkpoint": "checkpoint", "SweepSpec": "sweep",
}
_MODULES = ("arch", "data", "settings", "stats", "zoo", "models", "evaluation", "training", "tasks", "metrics",
            "encode", "progress", "partition", "losses", "tensorio", "paths", "curves", "checkpoint", "spec", "params",
            "outputs", "uploads", "caches", "catalog", "sweep")


def __getattr__(name: str):
    import importlib

    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    elif name in _MODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'merging_core' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


__all__ = ["data", "settings", "stats", "zoo", "MergeLabError", "Evaluator", "evaluate", "Loaded", "load", "resolve",
           "save", "TASKS", "get_task", "TrainConfig", "train", "merge", "merge_from_config", "MergeResult",
           "available_methods", "METHODS", "get_method", "compare", "compare_subsets", "greedy", "curve", "plane", "Curve", "Plane",
           "MergeSpec", "CurveSpec", "PlaneSpec", "open_checkpoint", "checkpoint", "spec", "params",
           "paths", "curves", "align", "ensemble", "sweep", "SweepSpec", "__version__"]
