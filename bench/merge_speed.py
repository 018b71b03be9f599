"""End-to-end merge time and peak memory: MergeLab vs mergekit 0.1.5, on two real MiniLM fine-tunes.

    MERGELAB_HOME=/tmp/zoo-home python bench/merge_speed.py [--models sst2-s0 sst2-s1] [--base minilm]
        [--repeats 3] [--density 0.2]

Every run is a fresh subprocess (Python start and imports included: what a user waits for), timed
from spawn to exit; peak memory is that process's max RSS (`os.wait4`). MergeLab runs through a tiny
driver that calls `merging_core.merge.merge(..., out=DIR)` and also reports `MergeResult.seconds`
(the engine's own time); mergekit runs its CLI (`mergekit-yaml config.yaml OUT`, here
`python -m mergekit.scripts.run_yaml`). Runs alternate between the tools; the input files are read
once first so every run sees a warm page cache. The outputs are compared tensor by tensor.

- average = mergekit `linear` (weight 1 each); mergekit runs the `mergekit.yaml` MergeLab wrote.
- ties (scope tensor, density d) = mergekit `ties` (weight 1, density d, normalize, lambda 1). mergekit
  refuses a base whose architecture class differs from the inputs' (`minilm` is a bare BertModel), so
  its base is minilm converted to BertForSequenceClassification naming with a zero classifier; the
  encoder must agree (max |diff| <= 1e-5: column agree_1e-5), the classifier differs by design
  (MergeLab averages the heads the base lacks, mergekit TIES-merges them against the zero head).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from common import print_table, write_results

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from merging_core.models import resolve  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

DRIVER = """
import json, sys, time
started = time.perf_counter()
from merging_core.merge import merge
imported = time.perf_counter()
a = json.loads(sys.argv[1])
r = merge(a["method"], a["models"], base=a["base"], params=a["params"], out=a["out"])
print(json.dumps({"import_s": imported - started, "merge_seconds": r.seconds}))
"""


def timed(cmd: list[str], env: dict) -> dict:
    """Run one command as a fresh process: wall seconds, peak RSS (MiB), its last stdout line."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # this process's own rusage, not all children's
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}):\n{stderr[-3000:]}")
    last = stdout.strip().splitlines()[-1] if stdout.strip() else ""
    return {"wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024, "stdout": last}


def mergekit_base(base: Path, model: Path, folder: Path) -> Path:
    """`base` (a bare BertModel) as a BertForSequenceClassification folder with a zero classifier."""
    folder.mkdir(parents=True)
    state = {f"bert.{k}": v for k, v in load_file(base / "model.safetensors").items() if not k.endswith("position_ids")}
    head = {k: v for k, v in load_file(model / "model.safetensors").items() if k.startswith("classifier.")}
    state.update({k: torch.zeros_like(v) for k, v in head.items()})
    save_file(state, folder / "model.safetensors", {"format": "pt"})
    shutil.copy(model / "config.json", folder / "config.json")  # same sizes, the model's head config
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (base / name).exists():
            shutil.copy(base / name, folder / name)
    return folder


def read_state(folder: Path) -> dict[str, torch.Tensor]:
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(f))
    return {k.removeprefix("bert."): v for k, v in state.items()}


def compare(ours: Path, theirs: Path) -> dict:
    a, b = read_state(ours), read_state(theirs)
    common = sorted(set(a) & set(b))
    diff = {n: (a[n].float() - b[n].float()).abs().max().item() for n in common}
    head = [n for n in common if n.startswith("classifier.")]
    return {"tensors": len(common), "only_mergelab": sorted(set(a) - set(b)), "only_mergekit": sorted(set(b) - set(a)),
            "max_abs_diff": max(diff[n] for n in common if n not in head),
            "classifier_max_abs_diff": max((diff[n] for n in head), default=0.0)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs=2, default=["sst2-s0", "sst2-s1"])
    parser.add_argument("--base", default="minilm")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--density", type=float, default=0.2)
    args = parser.parse_args()

    models = [Path(resolve(m).location) for m in args.models]
    base = Path(resolve(args.base).location)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    work = Path(tempfile.mkdtemp(prefix="merge_speed-"))
    mk_base = mergekit_base(base, models[0], work / "mergekit-base")
    for folder in models + [base, mk_base]:  # warm page cache for every run alike
        for f in folder.glob("*.safetensors"):
            f.read_bytes()

    cases = {
        "average": {"mergelab": ("average", {}, None), "mergekit": None},  # mergekit: MergeLab's mergekit.yaml
        "ties": {"mergelab": ("ties", {"density": args.density, "scope": "tensor", "lambda": 1.0}, args.base),
                 "mergekit": {"merge_method": "ties", "base_model": str(mk_base),
                              "models": [{"model": str(m), "parameters": {"weight": 1.0, "density": args.density}}
                                         for m in models],
                              "parameters": {"lambda": 1.0, "normalize": True}, "dtype": "float32"}},
    }
    rows, details = [], {}
    for case, spec in cases.items():
        method, params, case_base = spec["mergelab"]
        runs = {"mergelab": [], "mergekit": []}
        agreement = None
        for i in range(args.repeats):
            ours = work / f"{case}-mergelab-{i}"
            driver_args = {"method": method, "models": args.models, "base": case_base, "params": params,
                           "out": str(ours)}
            r = timed([sys.executable, "-c", DRIVER, json.dumps(driver_args)], env)
            r.update(json.loads(r.pop("stdout")))
            runs["mergelab"].append(r)
            config = work / f"{case}-mergekit.yaml"
            if spec["mergekit"] is None:
                shutil.copy(ours / "mergekit.yaml", config)
            else:
                config.write_text(json.dumps(spec["mergekit"]))  # JSON is YAML
            theirs = work / f"{case}-mergekit-{i}"
            r = timed([sys.executable, "-m", "mergekit.scripts.run_yaml", str(config), str(theirs)], env)
            r.pop("stdout")
            runs["mergekit"].append(r)
            if agreement is None:
                agreement = compare(ours, theirs)
            if i:  # keep the first pair for inspection only
                shutil.rmtree(ours)
                shutil.rmtree(theirs)
        med = {tool: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for tool, rs in runs.items()}
        rows.append({
            "method": case if case == "average" else f"ties (tensor, d={args.density})",
            "mergelab_wall_s": round(med["mergelab"]["wall_s"], 2),
            "mergelab_merge_s": round(med["mergelab"]["merge_seconds"], 2),
            "mergelab_import_s": round(med["mergelab"]["import_s"], 2),
            "mergekit_wall_s": round(med["mergekit"]["wall_s"], 2),
            "wall_ratio_mk/ml": round(med["mergekit"]["wall_s"] / med["mergelab"]["wall_s"], 2),
            "mergelab_rss_mib": round(med["mergelab"]["peak_rss_mib"]),
            "mergekit_rss_mib": round(med["mergekit"]["peak_rss_mib"]),
            "rss_ratio_mk/ml": round(med["mergekit"]["peak_rss_mib"] / med["mergelab"]["peak_rss_mib"], 2),
            "max_abs_diff": agreement["max_abs_diff"],
            "agree_1e-5": agreement["max_abs_diff"] <= 1e-5,
            "classifier_diff": agreement["classifier_max_abs_diff"],
        })
        details[case] = {"runs": runs, "agreement": agreement, "mergekit_config": config.read_text()}
    columns = list(rows[0])
    print_table(rows, columns)
    print(f"median of {args.repeats} fresh processes each; inputs {', '.join(args.models)}, base {args.base}; "
          f"outputs kept in {work}")
    write_results("merge_speed", {
        "models": args.models, "base": args.base, "repeats": args.repeats,
        "density": args.density, "load_average": os.getloadavg(), "rows": rows, "details": details,
        "notes": ["wall = spawn to exit of a fresh process (imports included); merge_s = MergeResult.seconds",
                  "peak RSS = ru_maxrss of that process (os.wait4), mmapped weight pages included",
                  "ties: MergeLab's own mergekit.yaml names the bare BertModel base, which mergekit 0.1.5 refuses "
                  "('Must specify --allow-crimes'); mergekit gets minilm converted to the classification naming "
                  "with a zero classifier, so only the classifier differs"],
    })


if __name__ == "__main__":
    main()
