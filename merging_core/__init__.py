"""MergeLab's engine: load, fine-tune, evaluate and (soon) merge transformer checkpoints.

The public API, shared by the CLI (`python -m merging_core ...`) and the Gradio app:

    import merging_core as ml
    ml.evaluate("minilm-sst2", "sst2", limit=200)      # -> {"task", "split", "n", "accuracy", "loss"}
    ml.train(ml.TrainConfig(task="rte", seed=0), out="runs/rte-s0")
    ml.zoo.build("default"); ml.zoo.entries()

Nothing here downloads at import time, and nothing here imports gradio.
"""

__version__ = "0.1.0"

from . import data, settings, zoo  # noqa: E402
from .errors import MergeLabError  # noqa: E402
from .evaluation import Evaluator, evaluate  # noqa: E402
from .models import Loaded, load, resolve, save  # noqa: E402
from .tasks import TASKS, get_task  # noqa: E402
from .training import TrainConfig, train  # noqa: E402

__all__ = ["data", "settings", "MergeLabError", "Evaluator", "evaluate", "Loaded", "load", "resolve", "save", "TASKS", "get_task",
           "TrainConfig", "train", "zoo", "__version__"]
