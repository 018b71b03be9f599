"""Helpers for the benchmarks: environment record, table printing, results files."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as `python bench/x.py` from anywhere


def environment() -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "invocation": " ".join(["python", *sys.argv]),  # the exact arguments of this run
    }


def print_table(rows: list[dict], columns: list[str]) -> None:
    cells = [[f"{r[c]:.3g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |")


def command_line() -> str:
    """The command that reproduces this run: the zoo's home as it was set, then the script and its arguments."""
    home = os.environ.get("MERGELAB_HOME")
    script = f"bench/{Path(sys.argv[0]).name}"
    return " ".join(([f"MERGELAB_HOME={home}"] if home else []) + ["python", script, *sys.argv[1:]])


def write_results(name: str, payload: dict) -> Path:
    """Write `payload` to bench/results/<name>-<device>.json, with the environment and the command of this run."""
    RESULTS.mkdir(exist_ok=True)
    device = "gpu" if torch.cuda.is_available() else "cpu"
    path = RESULTS / f"{name}-{device}.json"
    record = {"environment": environment(), "command": command_line(), **payload}
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
    return path


@torch.inference_mode()
def naive_loss(loaded, evaluator, batch_size: int) -> float:
    """The usual evaluation loop, as a reference: batches padded to 128 in data order, the model's own
    forward and loss (`loaded`: a merging_core.Loaded; `evaluator`: the Evaluator whose examples it scores)."""
    data, device = evaluator.encoded, evaluator.device
    losses, weights = [], []
    for start in range(0, len(data), batch_size):
        index = torch.arange(start, min(start + batch_size, len(data)))
        batch = data.batch(index, loaded.tokenizer.pad_token_id)
        pad = 128 - batch["input_ids"].shape[1]
        batch = {k: F.pad(v, (0, pad), value=(loaded.tokenizer.pad_token_id if k == "input_ids" else
                                                -100 if k == "labels" else 0)) if v.dim() == 2 else v
                 for k, v in batch.items()}
        out = loaded.model(**{k: v.to(device) for k, v in batch.items()})
        counted = int((batch["labels"] != -100).sum()) if batch["labels"].dim() == 2 else len(index)
        losses.append(out.loss.item() * counted)
        weights.append(counted)
    return sum(losses) / sum(weights)
