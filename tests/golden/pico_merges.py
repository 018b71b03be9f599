"""Merges of pico checkpoints whose every output tensor is pinned by a digest.

The digests in `pico_merges.json` were written by this module (`python -m tests.golden.pico_merges`)
from the engine as it was before `MergeSpec` and the checkpoint layer were introduced;
`tests/test_golden.py` re-runs every case and requires the same bits. Regenerate them only for a
change that is meant to alter merged weights, and say so in its commit. Data-aware cases read seeded
synthetic statistics files, so the digests do not depend on forward passes (whose float reductions
vary with the CPU and its thread count).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "pico_merges.json"

# name -> (method, model keys, base key, params, extra merge keyword arguments)
CASES: dict[str, tuple[str, list[str], str | None, dict, dict]] = {
    "average": ("average", ["sst2-0", "sst2-1", "sst2-2"], None, {}, {}),
    "average-weighted": ("average", ["sst2-0", "sst2-1"], None, {"weights": "3,1"}, {}),
    "task_arithmetic": ("task_arithmetic", ["sst2-0", "sst2-1"], "base", {"lambda": 0.4}, {}),
    "task_arithmetic-attention-first": ("task_arithmetic", ["sst2-0", "sst2-1"], "base", {"lambda": 1.0},
                                        {"components": ["attention"], "fallback": "first"}),
    "slerp": ("slerp", ["sst2-0", "sst2-1"], None, {"t": 0.3}, {}),
    "ties": ("ties", ["sst2-0", "sst2-1", "sst2-2"], "base", {}, {}),
    "ties-model-scope": ("ties", ["sst2-0", "sst2-1"], "base", {"density": 0.3, "scope": "model"}, {}),
    "dare": ("dare", ["sst2-0", "sst2-1"], "base", {"drop_rate": 0.5, "seed": 3}, {"seed": 5}),
    "average-separate-heads": ("average", ["sst2-0", "cola-1"], None, {}, {}),
    "fisher": ("fisher", ["sst2-0", "sst2-1"], None, {}, {"stats": ["fisher"]}),
    "fisher-normalized": ("fisher", ["sst2-0", "cola-1"], None, {"normalize": True}, {"stats": ["fisher"]}),
    "regmean": ("regmean", ["sst2-0", "sst2-1"], None, {}, {"stats": ["gram"]}),
    "regmean-alpha": ("regmean", ["sst2-0", "cola-1"], None, {"alpha": 0.5}, {"stats": ["gram"]}),
    "mats-regmean": ("mats", ["sst2-0", "sst2-1"], "base", {"objective": "regmean"}, {"stats": ["gram"]}),
    "mats-kfac": ("mats", ["sst2-0", "sst2-1"], "base", {"objective": "kfac", "iterations": 20},
                  {"stats": ["gram", "grad_gram"]}),
    "mats-diagonal-fisher": ("mats", ["sst2-0", "sst2-1"], "base", {"objective": "diagonal_fisher"},
                             {"stats": ["fisher"]}),
    # The conventions each reference code follows (see docs/methods.md).
    "regmean-tokens": ("regmean", ["sst2-0", "sst2-1"], None, {"weighting": "tokens"}, {"stats": ["gram"]}),
    "mats-regmean-tokens-plain-cg": ("mats", ["sst2-0", "sst2-1"], "base",
                                     {"objective": "regmean", "weighting": "tokens", "preconditioner": "none"},
                                     {"stats": ["gram"]}),
    "mats-regmean-closed-form": ("mats", ["sst2-0", "sst2-1"], "base", {"objective": "regmean", "solver": "closed_form"},
                                 {"stats": ["gram"]}),
    "fisher-model-normalized": ("fisher", ["sst2-0", "cola-1"], None, {"normalize": "model"}, {"stats": ["fisher"]}),
    "ties-majority": ("ties", ["sst2-0", "sst2-1", "sst2-2"], "base", {"zero_sign": "majority", "density": 1.0}, {}),
}


def make_models(root: Path) -> dict[str, str]:
    from tests.conftest import make_pico

    specs = {"sst2-0": ("sst2", 0), "sst2-1": ("sst2", 1), "sst2-2": ("sst2", 2), "cola-1": ("cola", 1),
             "base": ("sst2", 9)}
    return {key: str(make_pico(root / key, task, seed)) for key, (task, seed) in specs.items()}


def synthetic_stats(model: str, kinds: list[str], folder: Path, seed: int) -> Path:
    """A statistics file for `model` with seeded Grams / Fishers of the right shapes."""
    from merging_core import stats
    from merging_core.checkpoint import open_checkpoint

    ckpt = open_checkpoint(model)
    g = torch.Generator().manual_seed(seed)
    values: dict[str, dict[str, torch.Tensor]] = {}
    for name in ckpt.names:
        dtype, shape = ckpt.meta(name)
        entry: dict[str, torch.Tensor] = {}
        if "fisher" in kinds:
            entry["fisher"] = torch.rand(shape, generator=g) + 0.05
        if len(shape) == 2 and name.endswith(".weight") and "embeddings" not in name:
            for kind, size in (("gram", shape[1]), ("grad_gram", shape[0])):
                if kind in kinds:
                    x = torch.randn(2 * size, size, generator=g)
                    entry[kind] = x.T @ x / (2 * size)
                    entry[f"{kind}_count"] = torch.tensor(float(50 + seed))
        if entry:
            values[name] = entry
    path = folder / f"stats-{Path(model).name}-{'-'.join(kinds)}.safetensors"
    stats.save_stats(values, {"format": 1, "kind": kinds[0], "kinds": kinds, "model": model, "task": "sst2"}, path)
    return path


def digests(folder: Path) -> dict[str, str]:
    out = {}
    for file in sorted(folder.rglob("*.safetensors")):
        for name, tensor in sorted(load_file(file).items()):
            key = f"{file.relative_to(folder)}::{name}"
            out[key] = hashlib.sha256(tensor.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:24]
    return out


def run_case(name: str, models: dict[str, str], work: Path, merge_fn) -> dict[str, str]:
    method, keys, base, params, extra = CASES[name]
    extra = dict(extra)
    kinds = extra.pop("stats", None)
    paths = [models[k] for k in keys]
    if kinds:
        extra["stats_files"] = [str(synthetic_stats(p, kinds, work, seed)) for seed, p in enumerate(paths)]
    out = work / name
    merge_fn(method, paths, base=models[base] if base else None, params=params, out=out, **extra)
    return digests(out)


if __name__ == "__main__":
    import tempfile

    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("MERGELAB_DEVICE", "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MERGELAB_HOME"] = str(Path(tmp) / "home")
        from merging_core import merge

        models = make_models(Path(tmp) / "models")
        result = {name: run_case(name, models, Path(tmp), merge) for name in CASES}
    GOLDEN.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}: {len(result)} cases", file=sys.stderr)
