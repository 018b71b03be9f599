"""Similarity measures' cost per source module, and re-weighting after a temperature change.

    MERGELAB_HOME=/tmp/zoo-home python bench/ensemble_speed.py [--target sst2] [--kind lora] [--shots 32]

Each measure runs alone (so work two measures share, e.g. the module tuned on the shots, is counted for
each), over the zoo's modules of other tasks; seconds per source. The re-weighting time is what the
Ensemble tab's temperature slider runs: softmax over the stored similarities of every seed plus the
plotly figure (median and max of 50 calls after the first figure, which the tab draws when the
similarities arrive); the goal is under 50 ms, so the slider feels instant.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from common import print_table, write_results

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import merging_core as ml  # noqa: E402
from merging_core.ensemble import MEASURES, default_sources, read_module, softmax_weights  # noqa: E402
from merging_core.ensemble.fewshot import draw_shots  # noqa: E402
from merging_core.ensemble.similarity import measure  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", default="sst2")
    parser.add_argument("--kind", default="lora")
    parser.add_argument("--shots", type=int, default=32)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    from views.ensemble_tab import weights_view  # the slider's callback

    spec = ml.get_task(args.target)
    modules = [read_module(s) for s in default_sources(spec.name, args.kind)]
    shots = draw_shots(spec, ml.models.load_tokenizer(modules[0].ref), args.shots, 0)
    measure(modules[:1], shots, measures=("loss",), steps=2)  # warm-up: imports, first loads
    rows, state = [], {"measure": "loss", "scores": []}
    for name in MEASURES:
        started = time.perf_counter()
        found = measure(modules, shots, measures=(name,), steps=args.steps)
        seconds = time.perf_counter() - started
        rows.append({"measure": name, "sources": len(modules), "seconds": round(seconds, 2),
                     "s_per_source": round(seconds / len(modules), 2)})
        if name == "loss":
            state["scores"] = [found.scores["loss"]] * 3  # three seeds' worth of scores, as the tab holds them
        print(rows[-1], flush=True)
    softmax_ms = []
    view_ms = []
    started = time.perf_counter()
    weights_view(state, -1.0)  # the first figure pays plotly's one-off set-up; the tab draws it on "Measure"
    first_ms = (time.perf_counter() - started) * 1e3
    for i in range(50):
        t = 10 ** (-3 + 4 * i / 49)
        started = time.perf_counter()
        softmax_weights(state["scores"][0], t)
        softmax_ms.append((time.perf_counter() - started) * 1e3)
        started = time.perf_counter()
        weights_view(state, -3 + 4 * i / 49)
        view_ms.append((time.perf_counter() - started) * 1e3)
    rebuild = {"softmax_ms_median": round(statistics.median(softmax_ms), 3),
               "slider_callback_ms_median": round(statistics.median(view_ms), 2),
               "slider_callback_ms_max": round(max(view_ms), 2), "first_figure_ms": round(first_ms, 1),
               "goal_ms": 50}
    print_table(rows, ["measure", "sources", "seconds", "s_per_source"])
    print(rebuild)
    write_results("ensemble_speed", {"target": spec.name, "kind": args.kind, "shots": args.shots, "steps": args.steps,
                                     "rows": rows, "reweight": rebuild})


if __name__ == "__main__":
    main()
