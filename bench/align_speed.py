"""Permutation alignment time, phase by phase, at growing model sizes.

    python bench/align_speed.py [--examples 128] [--sizes tiny mini small base4]

Two randomly initialised BERTs with MLM heads per size (the time does not depend on what the weights
learned); `merging_core.align` with every site permuted (merge type `all`, Head-Perm, separate Q/K,
residual from `all` sites). Phases: activation statistics (both models over the same WikiText-2
blocks), Hungarian matching, writing B permuted. Beside it, the naive way to get the correlations
(ZipIt's: keep every activation, then the full correlation matrix of the stacked [X_A; X_B], of which
only the cross block is used), timed in the same run on the same activations and checked to agree.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from common import print_table, write_results

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import merging_core as ml  # noqa: E402
from merging_core.align import align  # noqa: E402
from merging_core.align.features import _taps  # noqa: E402

SIZES = {**ml.models.SCRATCH_SIZES,
         "base4": {"hidden_size": 768, "num_hidden_layers": 4, "num_attention_heads": 12, "intermediate_size": 3072}}


def random_model(size: dict, seed: int, folder: Path) -> Path:
    tokenizer = ml.models.load_tokenizer(ml.resolve("minilm"))
    config = ml.models.hf().BertConfig(vocab_size=len(tokenizer), **size)
    torch.manual_seed(seed)
    ml.models.head_class("mlm").from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@torch.inference_mode()
def naive_correlations(a: Path, b: Path, examples: int) -> tuple[float, dict[str, torch.Tensor]]:
    """Seconds for stack-then-corrcoef over all activations (forward passes included), and the cross blocks."""
    from merging_core.align import text_batches

    model_a, model_b = ml.load(str(a), device="cpu").model, ml.load(str(b), device="cpu").model
    batches = text_batches("wikitext2", "train", ml.models.load_tokenizer(ml.resolve(str(a))), examples, 16, "cpu")
    started = time.perf_counter()
    kept: dict[str, list[list[torch.Tensor]]] = {}
    for side, model in enumerate((model_a, model_b)):
        handles = []
        for site, (module, where) in _taps(model).items():
            def hook(mod, inputs, output, site=site, side=side, where=where):
                kept.setdefault(site, [[], []])[side].append((inputs[0] if where == "input" else output))
            handles.append(module.register_forward_hook(hook))
        for batch in batches:
            model.base_model(**{k: v for k, v in batch.items() if k != "labels"})
        for h in handles:
            h.remove()
    masks = [x["attention_mask"].bool() for x in batches]
    out = {}
    for site, (xs_a, xs_b) in kept.items():
        if site.startswith("qk."):
            continue
        feats_a = torch.cat([x[m] for x, m in zip(xs_a, masks)]).double()
        feats_b = torch.cat([x[m] for x, m in zip(xs_b, masks)]).double()
        d = feats_a.shape[1]
        out[site] = torch.corrcoef(torch.cat([feats_a, feats_b], 1).T)[:d, d:].float()
    return time.perf_counter() - started, out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=128)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES))
    args = parser.parse_args()
    rows = []
    for name in args.sizes:
        size = SIZES[name]
        work = Path(tempfile.mkdtemp(prefix=f"align_speed-{name}-"))
        a, b = random_model(size, 0, work / "a"), random_model(size, 1, work / "b")
        ml.evaluate(str(a), "wikitext2", limit=4)  # warm the caches and imports
        started = time.perf_counter()
        result = align(str(a), str(b), merge_type="all", attention="head-perm", residual="all", qk=True,
                       examples=args.examples, out=work / "aligned")
        total = time.perf_counter() - started
        naive_s, naive = naive_correlations(a, b, args.examples)
        agree = max((naive[s] - result.correlations[s]).abs().max().item() for s in naive)
        rows.append({"size": name, "hidden": size["hidden_size"], "layers": size["num_hidden_layers"],
                     "heads": size["num_attention_heads"], "ff": size["intermediate_size"],
                     "tokens": result.text["tokens"], "features_s": result.seconds["features"],
                     "matching_s": result.seconds["matching"], "apply_s": result.seconds["apply"],
                     "total_s": round(total, 2), "naive_corr_s": round(naive_s, 2),
                     "features_speedup": round(naive_s / result.seconds["features"], 2),
                     "max_corr_diff": agree})
        print(rows[-1], flush=True)
    print_table(rows, list(rows[0]))
    write_results("align_speed", {"examples": args.examples, "rows": rows})


if __name__ == "__main__":
    main()
