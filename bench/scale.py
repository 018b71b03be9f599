"""Merges at the scale people merge today: MergeLab vs mergekit 0.1.5 on Llama-shaped bf16 checkpoints.

    python bench/scale.py --cache /var/tmp/mergelab-scale [--shapes tinyllama 7b] [--methods ...]
        [--repeats 1] [--results scale]

Inputs: synthetic checkpoints written once into `--cache` (kept between runs): for each shape, a base
and two fine-tunes (base + a rank-8 update + small dense noise, the structure of a real task vector),
bf16, `LlamaForCausalLM` names and config, in hub-sized shards (5 GB, with the index: TinyLlama-1.1B is
one 2.2 GB file, a 7B three shards). Shapes: `tinyllama` = TinyLlama-1.1B (22 layers, hidden 2048,
MLP 5632, 32 heads, 4 KV heads, vocabulary 32000); `7b` = Llama-2-7B / Mistral-7B's layout without
GQA (32 layers, hidden 4096, MLP 11008, 32 heads, vocabulary 32000). The 7B shape needs ~55 GB of disk
(three 13.5 GB inputs and one output at a time).

Each merge runs as a fresh process, MergeLab's CLI and `mergekit-yaml` alternating, on the same inputs
with a warm page cache (every input file is read once before the runs). Per run: wall time from spawn to
exit; the peak resident memory of the whole process tree, sampled every 20 ms from /proc, split into
anonymous memory (what the process allocated) and file-backed memory (mapped files, which the kernel
can drop); and the largest difference between the two outputs, in float32. Methods, with the same
math in both tools (float32 arithmetic, bf16 output):

- `linear`: MergeLab `average` vs mergekit `linear` (weights 1, normalized);
- `task_arithmetic`: λ = 0.5 vs `task_arithmetic` with weight 0.5 each;
- `ties`: density 0.2, scope tensor, zero sign + vs `ties` (density 0.2, weight 1, normalize, λ 1);
- `ties-index`: the same with `tie_break=index` (entries tied with the k-th largest magnitude kept in
  index order, where mergekit and `ties` keep those its unstable sort puts first), against the same
  mergekit run;
- `slerp`: t = 0.5 between the fine-tunes vs `slerp` (base_model = the first);
- `ties-model` (MergeLab only): the paper's model-wide trim, streamed;
- `regmean` (MergeLab only; mergekit has none): each fine-tune's input Grams on 64 WikiText-2 texts
  (`MERGELAB_DATA` must point at the data), computed block by block into a fresh statistics cache, then
  the per-tensor solves; the row adds the statistics' seconds per model and per block, the solve time
  per layer, and the statistics files' size;
- `fisher` (MergeLab only): each fine-tune's diagonal Fisher (per-example gradients of the causal-LM
  log-likelihood of 16 WikiText-2 texts) into a fresh statistics cache, then the per-tensor weighted
  average; the row adds the statistics' seconds per model, the merge's time per layer and the files' size.

TIES runs its elementwise steps as compiled kernels on a large CPU merge (`merging_core.methods.fused`).
With `--eager` each TIES row also runs MergeLab with `MERGELAB_FUSED=0` (the eager PyTorch code) and
records its time and the largest difference between the two outputs (0: the same values). The kernels
are compiled once, cold, into an Inductor cache of the run's own (`--cache`/inductor) before the timed
runs; that compile time is reported on its own.

The floor is the time to read every input once and write the output's bytes once, on the same disk in
the same run: what no merge can beat. It ends with `fsync`, so its bytes are on the disk; a merge's
process ends when its output is in the page cache, some of it not written yet. The floor ratio compares
like with like: the merge's wall time plus the `sync` that follows it (`sync_s`, measured on its own).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from common import print_table, write_results

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from merging_core.tensorio import SafetensorsFile, ShardedWriter

SHAPES = {
    "small": {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 4, "num_attention_heads": 8,
              "num_key_value_heads": 2, "vocab_size": 32000},  # a quick check of the script itself (45M)
    "tinyllama": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
                  "num_key_value_heads": 4, "vocab_size": 32000},
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 32, "vocab_size": 32000},
}
SHARD = 5 * 10**9
METHODS = {
    "linear": ("average", {}, {"merge_method": "linear", "weight": 1.0}),
    "task_arithmetic": ("task_arithmetic", {"lambda": 0.5}, {"merge_method": "task_arithmetic", "weight": 0.5}),
    "ties": ("ties", {"density": 0.2, "scope": "tensor", "zero_sign": "plus"},
             {"merge_method": "ties", "weight": 1.0, "density": 0.2}),
    "ties-index": ("ties", {"density": 0.2, "scope": "tensor", "zero_sign": "plus", "tie_break": "index"},
                   {"merge_method": "ties", "weight": 1.0, "density": 0.2}),
    "slerp": ("slerp", {"t": 0.5}, {"merge_method": "slerp"}),
    "ties-model": ("ties", {"density": 0.2}, None),
    "regmean": ("regmean", {"examples": 64}, None),
    "fisher": ("fisher", {"examples": 16}, None),
}
BASED = ("task_arithmetic", "ties", "ties-index", "ties-model")
DATA_AWARE = ("regmean", "fisher")
STATS_TASK = "wikitext2"  # their data: each fine-tune's statistics on WikiText-2 texts (MERGELAB_DATA)


def layout(shape: dict) -> dict[str, tuple[int, ...]]:
    """LlamaForCausalLM's tensors and shapes, in the order transformers writes them."""
    h, m, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kv = h * shape["num_key_value_heads"] // shape["num_attention_heads"]
    names = {"model.embed_tokens.weight": (v, h)}
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}."
        names.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                      p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                      p + "mlp.gate_proj.weight": (m, h), p + "mlp.up_proj.weight": (m, h),
                      p + "mlp.down_proj.weight": (h, m), p + "input_layernorm.weight": (h,),
                      p + "post_attention_layernorm.weight": (h,)})
    names.update({"model.norm.weight": (h,), "lm_head.weight": (v, h)})
    return names


def synthesize(cache: Path, name: str, shape: dict) -> dict[str, Path]:
    """Write (once) the shape's base and two fine-tunes into `cache/name/`; their folders. A folder with its
    config.json is complete (it is written last) and kept, so an interrupted run resumes."""
    folders = {who: cache / name / who for who in ("base", "ft1", "ft2")}
    tensors = layout(shape)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
              "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
              "bos_token_id": 1, "eos_token_id": 2, "dtype": "bfloat16", **shape}
    for who, folder in folders.items():
        if (folder / "config.json").is_file():
            continue
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        seed = {"base": 0, "ft1": 1, "ft2": 2}[who]
        started = time.perf_counter()
        with ShardedWriter(folder, {n: (torch.bfloat16, s) for n, s in tensors.items()}, SHARD) as writer:
            for i, (n, s) in enumerate(tensors.items()):
                writer.write(n, weights(n, s, i, seed))
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        print(f"wrote {folder} in {time.perf_counter() - started:.0f} s", flush=True)
    return folders


def add_tokenizer(folders: dict[str, Path]) -> None:
    """Give the checkpoints a tokenizer, which statistics need: MiniLM's WordPiece (30522 ids, all inside
    the 32000-row embedding), from the packaged model."""
    from merging_core.models import MINILM, resolve

    packaged = resolve(MINILM).path
    for folder in folders.values():
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
            if (packaged / name).is_file() and not (folder / name).is_file():
                shutil.copy(packaged / name, folder / name)


def weights(name: str, shape: tuple[int, ...], index: int, seed: int) -> torch.Tensor:
    """A base tensor (seed 0), or a fine-tune of it: base + a rank-8 update + small dense noise."""
    generator = torch.Generator().manual_seed(index)
    base = torch.ones(shape) + 0.02 * torch.randn(shape, generator=generator) if len(shape) == 1 else \
        0.02 * torch.randn(shape, generator=generator)
    if seed:
        generator.manual_seed(10**6 * seed + index)
        if len(shape) == 2:
            low_rank = torch.randn(shape[0], 8, generator=generator) @ torch.randn(8, shape[1], generator=generator)
            base += 2e-3 * low_rank / 8
        base += 5e-4 * torch.randn(shape, generator=generator)
    return base.to(torch.bfloat16)


class TreeMemory:
    """Peak resident memory of a process and its descendants, sampled from /proc: anonymous and
    file-backed separately (RssAnon, RssFile + RssShmem)."""

    def __init__(self, pid: int, every: float = 0.02):
        self.pid, self.every = pid, every
        self.anon = self.file = self.total = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _tree(self) -> list[int]:
        pids, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            pids.append(pid)
            try:
                for task in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{task}/children") as f:
                        todo += [int(c) for c in f.read().split()]
            except OSError:
                pass
        return pids

    def _run(self) -> None:
        while not self._done.is_set():
            anon = file = 0
            for pid in self._tree():
                try:
                    with open(f"/proc/{pid}/status") as f:
                        fields = dict(line.split(":", 1) for line in f if line.startswith("Rss"))
                except OSError:
                    continue
                kb = {k: int(v.split()[0]) for k, v in fields.items()}
                anon += kb.get("RssAnon", 0)
                file += kb.get("RssFile", 0) + kb.get("RssShmem", 0)
            self.anon, self.file = max(self.anon, anon), max(self.file, file)
            self.total = max(self.total, anon + file)
            time.sleep(self.every)

    def stop(self) -> dict:
        self._done.set()
        self._thread.join()
        return {"peak_anon_mib": round(self.anon / 1024), "peak_file_mib": round(self.file / 1024),
                "peak_rss_mib": round(self.total / 1024)}


def timed(cmd: list[str], env: dict) -> dict:
    with tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
        memory = TreeMemory(proc.pid)
        code = proc.wait()
        wall = time.perf_counter() - started
        peaks = memory.stop()
        if code:
            err.seek(0)
            raise RuntimeError(f"{' '.join(map(str, cmd[:6]))} ... failed ({code}):\n{err.read()[-3000:]}")
    return {"wall_s": round(wall, 2), **peaks}


def files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def read_all(paths: list[Path]) -> int:
    """Read every byte of `paths` once (64 MB at a time); the bytes read."""
    total, buffer = 0, bytearray(64 << 20)
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while True:
                n = f.readinto(buffer)
                if not n:
                    break
                total += n
    return total


def floor(inputs: list[Path], out_bytes: int, scratch: Path) -> float:
    """Seconds to read every input once and write `out_bytes` once (then fsync): the IO a merge must do."""
    started = time.perf_counter()
    read_all(inputs)
    chunk = bytes(64 << 20)
    with open(scratch, "wb") as f:
        f.writelines(chunk for _ in range(out_bytes // len(chunk)))
        f.write(chunk[: out_bytes % len(chunk)])
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - started
    scratch.unlink()
    return seconds


def opened(folder: Path) -> dict[str, SafetensorsFile]:
    """Every tensor name of an output folder, with the file that holds it."""
    where: dict[str, SafetensorsFile] = {}
    for path in files(folder):
        handle = SafetensorsFile(path)
        where.update(dict.fromkeys(handle.keys(), handle))
    return where


def max_difference(ours: Path, theirs: Path) -> float:
    """The largest |a - b| over every tensor of two outputs (float32), read tensor by tensor."""
    mine, other = opened(ours), opened(theirs)
    if set(mine) != set(other):
        raise RuntimeError(f"different tensors: {sorted(set(mine) ^ set(other))[:5]}")
    worst = 0.0
    for k in mine:
        worst = max(worst, float((mine[k].get(k).float() - other[k].get(k).float()).abs().max()))
    return worst


def mergekit_config(method: str, folders: dict[str, Path]) -> dict:
    settings = dict(METHODS[method][2])
    kind = settings.pop("merge_method")
    config = {"merge_method": kind, "dtype": "float32", "out_dtype": "bfloat16"}
    if kind == "slerp":
        config.update(base_model=str(folders["ft1"]), parameters={"t": 0.5},
                      models=[{"model": str(folders["ft1"])}, {"model": str(folders["ft2"])}])
        return config
    config["models"] = [{"model": str(folders[m]), "parameters": settings} for m in ("ft1", "ft2")]
    if kind in ("task_arithmetic", "ties"):
        config["base_model"] = str(folders["base"])
    if kind == "ties":
        config["parameters"] = {"normalize": True, "lambda": 1.0}
    return config


def mergelab_command(method: str, folders: dict[str, Path], out: Path) -> list[str]:
    name, params, _ = METHODS[method]
    cmd = [sys.executable, "-m", "merging_core", "merge", "--method", name, "--models", str(folders["ft1"]),
           str(folders["ft2"]), "--out", str(out), "--device", "cpu"]
    if method in BASED:
        cmd += ["--base", str(folders["base"])]
    if params:
        cmd += ["--set", ",".join(f"{k}={v}" for k, v in params.items())]
    if method in DATA_AWARE:
        cmd += ["--stats-task", STATS_TASK]
    return cmd


def compile_kernels(env: dict) -> float:
    """Seconds to compile TIES's kernels (`merging_core.methods.fused`) into an empty Inductor cache, in
    a fresh process: what the first large TIES merge on a machine pays once."""
    # (on all cores but one, as a merge runs them: Inductor compiles for a number of threads; and on three
    # tensors of their own: the same tensor passed twice, or views of one storage at offsets, trace other
    # graphs than a merge calls)
    code = ("import torch; from merging_core.methods import fused; f, g, h = (torch.rand(1 << 20) for _ in range(3))\n"
            "cores = torch.get_num_threads(); torch.set_num_threads(max(1, cores - 1))\n"
            "for b, x, y in ((f, g, h), (f.bfloat16(), g.bfloat16(), h.bfloat16())):\n"
            "    fused.ties_combine(b, [x, y], [0.0, 0.0], 1.0, 1.0, dtype=b.dtype); fused.band(x, b, 0.0, 1.0)\n"
            "    fused.tie_counts(b, [x, y], [0.0, 0.0]); fused.trim_tally(b, [x, y], [0.0, 0.0])\n"
            "    fused.trim_tally(b, [x, y], [0.0, 0.0], votes=True)\n"
            "fused.ties_disjoint(f, torch.stack([g, h]), 1.0, 1.0)\n"
            "torch.set_num_threads(cores)  # (a merge of whole tensors runs on every core)\n"
            "for b, x, y in ((f, g, h), (f.bfloat16(), g.bfloat16(), h.bfloat16())):\n"
            "    fused.ties_combine(b, [x, y], [0.0, 0.0], 1.0, 1.0, dtype=b.dtype)\n"
            "fused.ties_disjoint(f, torch.stack([g, h]), 1.0, 1.0); assert fused.failure() is None, fused.failure()")
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, check=True)
    return round(time.perf_counter() - started, 1)


def statistics_times(home: Path, layers: int) -> dict:
    """A data-aware run's statistics, from the records its cache holds: seconds per model and per block."""
    seconds = [json.loads(p.read_text())["seconds"] for p in sorted((home / "cache" / "stats").glob("*.json"))]
    return {"stats_s": seconds, "stats_s_per_block": round(sum(seconds) / len(seconds) / layers, 2),
            "stats_mib": round(sum(p.stat().st_size for p in (home / "cache" / "stats").glob("*.safetensors")) / 2**20)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, required=True, help="where the synthetic checkpoints are kept")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=["tinyllama"])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--no-mergekit", action="store_true", help="MergeLab only (e.g. the 7B shape's memory)")
    parser.add_argument("--results", default="scale")
    parser.add_argument("--eager", action="store_true", help="TIES rows also run eagerly (MERGELAB_FUSED=0)")
    args = parser.parse_args()
    inductor = args.cache / "inductor"
    shutil.rmtree(inductor, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TORCHINDUCTOR_CACHE_DIR": str(inductor)}
    compile_s = compile_kernels(env) if any(m.startswith("ties") for m in args.methods) else None
    rows = []
    for shape in args.shapes:
        folders = synthesize(args.cache, shape, SHAPES[shape])
        inputs = [f for who in ("base", "ft1", "ft2") for f in files(folders[who])]
        params = sum(math.prod(s) for s in layout(SHAPES[shape]).values())
        out_bytes = 2 * params
        read_all(inputs)  # warm the page cache, as for every run after it
        floor_s = floor(inputs, out_bytes, args.cache / "floor.bin")
        print(f"{shape}: {params / 1e9:.2f}B parameters; read inputs once + write output once: {floor_s:.1f} s",
              flush=True)
        for method in args.methods:
            used = [f for who in (("base", "ft1", "ft2") if method in BASED else ("ft1", "ft2"))
                    for f in files(folders[who])]
            for repeat in range(args.repeats):
                row = {"shape": shape, "method": method, "params_b": round(params / 1e9, 2), "repeat": repeat,
                       "floor_s": round(floor(used, out_bytes, args.cache / "floor.bin"), 2)}
                ours = args.cache / "out-mergelab"
                shutil.rmtree(ours, ignore_errors=True)
                if method in DATA_AWARE:  # statistics computed afresh, into a home of their own
                    add_tokenizer(folders)
                    home = Path(tempfile.mkdtemp(dir=args.cache))
                    mine = timed(mergelab_command(method, folders, ours), {**env, "MERGELAB_HOME": str(home)})
                    row.update(statistics_times(home, SHAPES[shape]["num_hidden_layers"]))
                    row["solve_s_per_layer"] = round((mine["wall_s"] - sum(row["stats_s"]))
                                                     / SHAPES[shape]["num_hidden_layers"], 2)
                    shutil.rmtree(home)
                else:
                    mine = timed(mergelab_command(method, folders, ours), env)
                row.update({f"mergelab_{k}": v for k, v in mine.items()})
                started = time.perf_counter()
                os.sync()  # what the merge left to write, as the floor's fsync waits for its own
                row["sync_s"] = round(time.perf_counter() - started, 2)
                if METHODS[method][2] is not None and not args.no_mergekit:
                    theirs = args.cache / "out-mergekit"
                    shutil.rmtree(theirs, ignore_errors=True)
                    config = args.cache / "mergekit.yaml"
                    config.write_text(json.dumps(mergekit_config(method, folders)))
                    other = timed(["mergekit-yaml", str(config), str(theirs), "--no-copy-tokenizer",
                                   "--no-write-model-card", "--out-shard-size", "5B"], env)
                    row.update({f"mergekit_{k}": v for k, v in other.items()})
                    row["max_abs_diff"] = max_difference(ours, theirs)
                    row["time_ratio"] = round(mine["wall_s"] / other["wall_s"], 3)
                    shutil.rmtree(theirs)
                if args.eager and method.startswith("ties"):
                    eager = args.cache / "out-eager"
                    shutil.rmtree(eager, ignore_errors=True)
                    slow = timed(mergelab_command(method, folders, eager), {**env, "MERGELAB_FUSED": "0"})
                    row.update({f"eager_{k}": v for k, v in slow.items()})
                    row["eager_max_abs_diff"] = max_difference(ours, eager)
                    row["eager_ratio"] = round(slow["wall_s"] / mine["wall_s"], 2)
                    shutil.rmtree(eager)
                row["floor_ratio"] = round((mine["wall_s"] + row["sync_s"]) / row["floor_s"], 2)
                row["compile_s"] = compile_s
                shutil.rmtree(ours)
                rows.append(row)
                print(json.dumps(row), flush=True)
    columns = ["shape", "method", "floor_s", "mergelab_wall_s", "sync_s", "mergekit_wall_s", "time_ratio",
               "floor_ratio", "mergelab_peak_anon_mib", "mergelab_peak_file_mib", "mergekit_peak_anon_mib",
               "mergekit_peak_file_mib", "max_abs_diff", "eager_wall_s", "eager_ratio", "eager_max_abs_diff"]
    print_table(rows, columns)
    write_results(args.results, {"rows": rows})


if __name__ == "__main__":
    main()
