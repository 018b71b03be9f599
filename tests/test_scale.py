"""Merging checkpoints the way large models are stored: sharded safetensors with an index, in bf16, with
tied embeddings; merges that read large tensors slice by slice; TIES's model-wide threshold found by a
streaming selection; and a merge inside a memory budget smaller than the models.

Every model here is a tiny random Llama (tied embeddings, bf16) saved by transformers itself, sharded
(`save_pretrained(max_shard_size=...)`) and unsharded, so that "sharded equals unsharded" compares two
layouts of the same bytes.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import merging_core as ml
from merging_core import tensorio
from merging_core.errors import MergeLabError
from merging_core.merge import merge
from merging_core.methods import WholeModel, ties_dare
from merging_core.methods.ties_dare import kth_largest, streamed_thresholds
from merging_core.tensorio import INDEX

from .test_family_scoring import word_tokenizer
from .test_robust import cli_error

engine = importlib.import_module("merging_core.merge")  # the module (`merging_core.merge` is also the function)
ROOT = Path(__file__).resolve().parents[1]
SHARD = "16KB"  # the tiny models' 70 KB of bf16 tensors in several shards
METHODS = [("average", {}), ("task_arithmetic", {"lambda": 0.7}), ("ties", {"density": 0.3}),
           ("ties", {"density": 0.3, "scope": "tensor"}), ("ties", {"density": 0.3, "zero_sign": "majority"}),
           ("dare", {"drop_rate": 0.3}), ("slerp", {"t": 0.3})]


def tiny_llama(seed: int, base: transformers.PreTrainedModel | None = None) -> transformers.PreTrainedModel:
    """A Llama with grouped-query attention and an LM head tied to its embeddings, in bf16: a random base,
    or a "fine-tune" of `base` (base plus small noise, so that its task vector is small and structured)."""
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                      max_position_embeddings=64, bos_token_id=2, eos_token_id=3, pad_token_id=None)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if base is not None:
                p.copy_(dict(base.named_parameters())[name] + 0.01 * torch.randn(p.shape, generator=generator))
            else:
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model.to(torch.bfloat16).eval()


@pytest.fixture(scope="module")
def llamas(tmp_path_factory) -> dict[str, dict[str, str]]:
    """{"sharded"|"single": {"base"|"a"|"b": folder}}: one base and two fine-tunes, each saved both ways."""
    root = tmp_path_factory.mktemp("scale")
    base = tiny_llama(0)
    models = {"base": base, "a": tiny_llama(1, base), "b": tiny_llama(2, base)}
    folders: dict[str, dict[str, str]] = {"sharded": {}, "single": {}}
    for name, model in models.items():
        for layout, size in (("sharded", SHARD), ("single", "1GB")):
            out = root / layout / name
            model.save_pretrained(out, max_shard_size=size)
            word_tokenizer(pad=False).save_pretrained(out)
            folders[layout][name] = str(out)
    assert (Path(folders["sharded"]["a"]) / INDEX).is_file() and len(list(Path(folders["sharded"]["a"]).glob(
        "*.safetensors"))) > 2, "the fixture must be sharded"
    assert not (Path(folders["single"]["a"]) / INDEX).exists()
    return folders


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def run(layout: dict[str, str], method: str, params: dict, out: Path | None = None, **fields):
    two = [layout["a"], layout["b"]]
    base = layout["base"] if ml.methods.get_method(method).base_required(ml.methods.get_method(method).parse(params)) \
        else None
    return merge(method, two, base=base, params=params, out=out, **fields)


@pytest.mark.parametrize("method,params", METHODS, ids=[f"{m}-{'-'.join(map(str, p.values()))}" for m, p in METHODS])
def test_sharded_merge_equals_unsharded(llamas, tmp_path, method, params):
    run(llamas["single"], method, params, tmp_path / "single")
    run(llamas["sharded"], method, params, tmp_path / "sharded", shard_size=SHARD)
    single, sharded = tensors(tmp_path / "single"), tensors(tmp_path / "sharded")
    assert (tmp_path / "sharded" / INDEX).is_file() and not (tmp_path / "single" / INDEX).exists()
    assert len(list((tmp_path / "sharded").glob("model-*-of-*.safetensors"))) > 2
    assert "lm_head.weight" not in single  # tied, as in the inputs
    assert single.keys() == sharded.keys() and all(t.dtype == torch.bfloat16 for t in sharded.values())
    for name in single:
        assert torch.equal(single[name], sharded[name]), name
    index = json.loads((tmp_path / "sharded" / INDEX).read_text())
    assert set(index["weight_map"]) == set(sharded)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sharded.values())


def test_written_index_loads_with_from_pretrained(llamas, tmp_path):
    run(llamas["sharded"], "task_arithmetic", {"lambda": 0.5}, tmp_path / "m", shard_size=SHARD)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    written = tensors(tmp_path / "m")
    state = model.state_dict()
    assert model.dtype == torch.bfloat16
    for name, t in written.items():
        assert torch.equal(state[name], t), name
    assert torch.equal(model.lm_head.weight, written["model.embed_tokens.weight"])  # still tied
    ids = torch.tensor([[2, 10, 11, 12]])
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_output_dtype(llamas, tmp_path):
    ours = run(llamas["sharded"], "average", {}, tmp_path / "fp32", dtype="fp32")
    written = tensors(tmp_path / "fp32")
    assert all(t.dtype == torch.float32 for t in written.values())
    assert json.loads((tmp_path / "fp32" / "config.json").read_text())["dtype"] == "float32"
    assert ours.spec.dtype == "fp32"
    bf16 = run(llamas["sharded"], "average", {}).state  # default: the inputs' dtype
    for name, t in written.items():
        assert torch.equal(t.to(torch.bfloat16), bf16[name.removeprefix("model.")]), name  # same fp32 math, rounded


@pytest.mark.parametrize("method,params", [("average", {"weights": [0.7, 0.3]}), ("task_arithmetic", {"lambda": 0.7}),
                                           ("ties", {"density": 0.3}), ("ties", {"density": 1.0})])
def test_slice_by_slice_equals_whole_tensors(llamas, monkeypatch, method, params):
    """Elementwise merges of tensors larger than the slice size: the same bits as whole tensors."""
    whole = run(llamas["single"], method, params).state
    monkeypatch.setattr(engine, "CHUNK", 1000)  # the embedding (16,384 values) in 17 slices
    sliced = run(llamas["single"], method, params)
    assert sliced.state.keys() == whole.keys()
    for name in whole:
        assert torch.equal(sliced.state[name], whole[name]), name


@pytest.mark.parametrize("method,params,slice_size", [
    ("dare", {"drop_rate": 0.3}, None), ("slerp", {"t": 0.3}, 1000 * engine.IN_PLACE),
    ("ties", {"density": 0.3, "scope": "tensor"}, None),
    ("ties", {"density": 0.3, "scope": "tensor", "tie_break": "index"}, 1000)])
def test_which_methods_see_slices(llamas, monkeypatch, method, params, slice_size):
    """DARE (its masks are drawn per tensor) and TIES breaking ties by mergekit's sort always get whole
    tensors; SLERP and TIES breaking ties by index get slices of tensors over WHOLE values, after a scan:
    CHUNK values, or IN_PLACE times more where the inputs are read as stored (SLERP on the CPU)."""
    seen = []
    original = ml.methods.METHODS[method]

    def spy(job):
        seen.append((job.name, tuple(job.tensors[0].shape)))
        return original.merge_tensor(job)

    monkeypatch.setattr(engine, "CHUNK", 1000)
    monkeypatch.setattr(engine, "WHOLE", 10_000)
    monkeypatch.setitem(ml.methods.METHODS, method, dataclasses.replace(original, merge_tensor=spy))
    run(llamas["single"], method, params)
    embedding = [shape for name, shape in seen if name == "embed_tokens.weight"]
    full, rest = divmod(512 * 32, slice_size or 1)
    assert embedding == ([(slice_size,)] * full + [(rest,)] if slice_size else [(512, 32)])
    assert ("layers.0.mlp.up_proj.weight", (64, 32)) in seen  # 2,048 values: whole either way


def fake_model(tensors_: list[list[torch.Tensor]], bases: list[torch.Tensor], chunk: int) -> WholeModel:
    """A WholeModel whose tensors() yields each parameter in flat slices of `chunk` values."""
    def pieces():
        for i, base in enumerate(bases):
            flat = [t.flatten() for t in tensors_[i]]
            for start in range(0, base.numel(), chunk):
                yield f"p{i}", None, [t[start:start + chunk] for t in flat], base.flatten()[start:start + chunk]
    return WholeModel([f"p{i}" for i in range(len(bases))], pieces)


def sampled(tensors_: list[list[torch.Tensor]], bases: list[torch.Tensor], head: int):
    """A `WholeModel.sample`: the first `head` values of each parameter, with its size."""
    def sample():
        for i, base in enumerate(bases):
            yield f"p{i}", base.numel(), [t.flatten()[:head] for t in tensors_[i]], base.flatten()[:head]
    return sample


def bf16_models(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(300, 40), (7,), (1000,), (64, 64)]
    bases = [torch.randn(s, generator=generator).bfloat16().float() for s in shapes]
    models = [[(b + 0.01 * torch.randn(b.shape, generator=generator)).bfloat16().float() for _ in range(2)]
              for b in bases]
    models[1][0] = bases[1].clone()  # a parameter one model left unchanged: zero task vector
    return models, bases


@pytest.mark.parametrize("density", [0.001, 0.2, 0.5, 0.999])
@pytest.mark.parametrize("estimate", ["none", "sampled", "missed"])
def test_streamed_threshold_is_exact(density, estimate, monkeypatch):
    """Per model, the streaming radix selection finds exactly the k-th largest task-vector magnitude of the
    whole model, bf16 ties and zeros included, and the sum of the entries the trim keeps: in two passes,
    in one after estimating the bucket from a sample, and in two when that estimate misses."""
    models, bases = bf16_models()
    model = fake_model(models, bases, chunk=333)
    passes = []
    tensors = model.tensors
    model.tensors = lambda: passes.append(1) or tensors()
    if estimate == "missed":
        far = (1 << 15) - ties_dare.WINDOW  # (the buckets of inf and NaN)
        monkeypatch.setattr(ties_dare, "_estimated_windows", lambda sample, density: [far, far])
    sample = None if estimate == "none" else sampled(models, bases, head=20_000)  # (all of each: exact)
    thresholds, totals, _ = streamed_thresholds(model, density, sample)
    assert len(passes) == (1 if estimate == "sampled" else 2)
    for i in range(2):
        deltas = torch.cat([(models[p][i] - bases[p]).flatten() for p in range(len(bases))])
        k = max(1, int(density * deltas.numel()))
        assert thresholds[i] == float(kth_largest(deltas.abs(), k))
        assert thresholds[i] == float(deltas.abs().sort(descending=True).values[k - 1])
        kept = deltas[deltas.abs() >= thresholds[i]]
        assert totals[i] == pytest.approx(float(kept.double().sum()), rel=1e-9, abs=1e-9)


def test_ties_model_scope_reads_the_model_once_for_its_threshold(llamas, tmp_path, monkeypatch):
    """The sample (the head of every parameter) places the threshold's bucket, so one pass over the
    inputs finds the exact threshold and the merge is the second; the output equals a two-pass merge's."""
    passes = []
    real = engine._method_tensors
    monkeypatch.setattr(engine, "_method_tensors", lambda *a: passes.append(1) or real(*a))
    run(llamas["single"], "ties", {"density": 0.2}, tmp_path / "one")
    assert len(passes) == 1
    far = (1 << 15) - ties_dare.WINDOW  # an estimate that misses: the second threshold pass runs
    monkeypatch.setattr(ties_dare, "_estimated_windows", lambda sample, density: [far, far])
    run(llamas["single"], "ties", {"density": 0.2}, tmp_path / "two")
    assert len(passes) == 3
    one, two = tensors(tmp_path / "one"), tensors(tmp_path / "two")
    assert all(torch.equal(one[name], two[name]) for name in one)


# -- bad input: one line, nothing half-written ---------------------------------------------------------


@pytest.fixture()
def broken(llamas, tmp_path):
    """A writable copy of the sharded fine-tune 'a', to break."""
    def copy() -> Path:
        return Path(shutil.copytree(llamas["sharded"]["a"], tmp_path / "broken"))
    return copy


def refused(llamas, model: Path, tmp_path: Path, **fields) -> str:
    out = tmp_path / "out"
    with pytest.raises(MergeLabError) as caught:
        merge("average", [str(model), llamas["sharded"]["b"]], out=out, **fields)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    text = str(caught.value)
    assert "\n" not in text
    return text


def test_missing_shard(llamas, broken, tmp_path):
    folder = broken()
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    text = refused(llamas, folder, tmp_path)
    assert shard.name in text and "missing" in text and INDEX in text


def test_index_names_a_tensor_no_shard_holds(llamas, broken, tmp_path):
    folder = broken()
    index = json.loads((folder / INDEX).read_text())
    first = sorted(folder.glob("model-*.safetensors"))[0].name
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = first
    (folder / INDEX).write_text(json.dumps(index))
    text = refused(llamas, folder, tmp_path)
    assert "model.layers.9.mlp.up_proj.weight" in text and first in text


def test_shards_of_different_dtypes(llamas, broken, tmp_path):
    folder = broken()
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    save_file({k: v.float() for k, v in load_file(shard).items()}, shard)
    text = refused(llamas, folder, tmp_path)
    assert "BF16" in text and "F32" in text and shard.name in text


def test_not_enough_disk_is_checked_before_writing(llamas, tmp_path, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(ml.tensorio.shutil, "disk_usage",
                        lambda path: real(path)._replace(free=10_000))  # 10 KB free
    text = refused(llamas, Path(llamas["sharded"]["a"]), tmp_path)
    assert "needs" in text and "10.0 KB" not in text and "free" in text


@pytest.mark.parametrize("size", ["5 parsecs", "0", "-1GB", ""])
def test_bad_shard_size(llamas, size, capsys):
    with pytest.raises(MergeLabError, match="shard size") as caught:
        ml.spec.MergeSpec("average", ("a", "b"), shard_size=size)
    assert caught.value.param == "shard_size"


def test_cli_shard_size_and_dtype(llamas, tmp_path, capsys):
    from merging_core.cli import main
    main(["merge", "--method", "average", "--models", llamas["sharded"]["a"], llamas["sharded"]["b"],
          "--shard-size", SHARD, "--dtype", "fp16", "--device", "cpu", "--out", str(tmp_path / "m"), "--json"])
    written = tensors(tmp_path / "m")
    assert (tmp_path / "m" / INDEX).is_file() and all(t.dtype == torch.float16 for t in written.values())
    line = cli_error(capsys, "merge", "--method", "average", "--models", llamas["sharded"]["a"],
                     llamas["sharded"]["b"], "--shard-size", "lots", "--out", tmp_path / "n")
    assert line.startswith("error: --shard-size: shard size 'lots' is not a size")
    assert "--device" in cli_error(capsys, "merge", "--method", "average", "--models", llamas["sharded"]["a"],
                                   llamas["sharded"]["b"], "--device", "cuda:7" if not torch.cuda.is_available()
                                   else "tpu", "--out", tmp_path / "n")
    assert not (tmp_path / "n").exists()


# -- memory --------------------------------------------------------------------------------------------


BUDGET = 256 * 2**20  # bytes of address space the merging process may add to what its imports took


@pytest.mark.integration  # writes ~900 MB of checkpoints
def test_merge_larger_than_the_memory_budget(tmp_path):
    """Three 295 MB bf16 checkpoints (a base and two fine-tunes) merged by task arithmetic and TIES (model
    scope) in a process whose address space may grow by 256 MB only: the inputs are read slice by slice
    into buffers (no memory map, which would count the whole file against the limit)."""
    shapes = {"model.embed_tokens.weight": (36000, 2048), "lm_head.weight": (36000, 2048),
              "model.norm.weight": (2048,)}
    generator = torch.Generator().manual_seed(0)
    base = {k: (0.02 * torch.randn(s, generator=generator)).bfloat16() for k, s in shapes.items()}
    config = transformers.LlamaConfig(vocab_size=36000, hidden_size=2048, intermediate_size=4096, num_hidden_layers=0,
                                      num_attention_heads=16, tie_word_embeddings=False).to_dict()
    for name, scale in (("base", 0.0), ("a", 1.0), ("b", -0.5)):
        folder = tmp_path / name
        folder.mkdir()
        state = {k: (v.float() + scale * 1e-3 * torch.randn(v.shape, generator=generator)).bfloat16()
                 for k, v in base.items()}
        save_file(state, folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForCausalLM"]}))
    assert all(f.stat().st_size > BUDGET for f in tmp_path.glob("*/model.safetensors"))
    script = textwrap.dedent(f"""
        import resource, sys
        import torch, merging_core
        from merging_core.merge import merge
        torch.set_num_threads(1)
        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize"))
        resource.setrlimit(resource.RLIMIT_AS, (vm + {BUDGET}, vm + {BUDGET}))
        root = sys.argv[1]
        for method, params in (("task_arithmetic", {{"lambda": 0.5}}), ("ties", {{"density": 0.2}})):
            merge(method, [root + "/a", root + "/b"], base=root + "/base", params=params,
                  out=root + "/" + method)
        print("merged within", {BUDGET} >> 20, "MB")
    """)
    # A hard cap on memory is what MALLOC_MMAP_THRESHOLD_ is for (docs/usage.md, "Merging large models"):
    # every buffer then comes from the kernel and goes back at once, so the limit meets the engine's own
    # working set, not the free heap glibc keeps for speed.
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": str(1 << 20), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    merged = load_file(tmp_path / "task_arithmetic" / "model.safetensors")
    a, b = (load_file(tmp_path / n / "model.safetensors") for n in ("a", "b"))
    name = "lm_head.weight"
    theta = base[name].float()
    expected = theta + 0.5 * ((a[name].float() - theta) + (b[name].float() - theta))
    assert torch.equal(merged[name], expected.bfloat16())
    assert (tmp_path / "ties" / "model.safetensors").is_file()


@pytest.mark.integration
@pytest.mark.parametrize("reader", ["mmap", "pread"])
def test_the_budget_is_tight_enough_to_mean_something(tmp_path, reader):
    """The control of the test above: two files of 0.75 budget each, a small slice read from each. Memory
    maps (safetensors' own reader) count both whole files against the limit and fail; MergeLab's reader
    holds only the slices."""
    for name in "ab":
        save_file({"w": torch.zeros(3 * BUDGET // 8, dtype=torch.bfloat16)}, tmp_path / f"{name}.safetensors")
    script = textwrap.dedent(f"""
        import resource, sys
        from safetensors import safe_open
        from merging_core.tensorio import SafetensorsFile
        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize"))
        resource.setrlimit(resource.RLIMIT_AS, (vm + {BUDGET}, vm + {BUDGET}))
        paths = [sys.argv[1] + f"/{{n}}.safetensors" for n in "ab"]
        if sys.argv[2] == "mmap":
            slices = [safe_open(p, framework="pt").get_slice("w")[:1000] for p in paths]
        else:
            slices = [SafetensorsFile(p).get("w", 0, 1000) for p in paths]
        assert all(int(s.count_nonzero()) == 0 for s in slices)
    """)
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path), reader], capture_output=True, text=True,
                          env=env, timeout=300)
    assert (done.returncode == 0) == (reader == "pread"), done.stderr[-2000:]


INDEX_TIES = {"scope": "tensor", "tie_break": "index"}


@pytest.mark.parametrize("method,params", [("slerp", {"t": 0.3}), ("ties", {"density": 0.3, **INDEX_TIES}),
                                           ("ties", {"density": 0.3, "zero_sign": "total", **INDEX_TIES}),
                                           ("ties", {"density": 1.0, "zero_sign": "majority", **INDEX_TIES})])
def test_scanned_slices_agree_with_whole_tensors(llamas, monkeypatch, method, params):
    """SLERP and per-tensor TIES (ties broken by index) on tensors too large to hold whole: a scan of the
    tensor, then slice by slice. The same values as whole tensors, but for the rounding of SLERP's angle
    (its sums are added in another order)."""
    whole = run(llamas["single"], method, params).state
    monkeypatch.setattr(engine, "CHUNK", 1000)
    monkeypatch.setattr(engine, "WHOLE", 10_000)  # the embedding (16,384 values) scanned, then in slices
    sliced = run(llamas["single"], method, params).state
    for name in whole:
        differ = (sliced[name].float() - whole[name].float()).abs()
        if method == "slerp":  # the angle's float64 sums in another order: at most a bf16 rounding flip
            assert bool((differ <= 2 ** -7 * whole[name].float().abs()).all()), name
        else:
            assert float(differ.max()) == 0, name


def test_tie_break_index_differs_from_the_sort_only_at_ties(llamas):
    """bf16 task vectors tie at the threshold: both rules keep exactly k entries per tensor and model, the
    same ones wherever a magnitude is not tied with the k-th largest."""
    by_sort = run(llamas["single"], "ties", {"density": 0.3, "scope": "tensor"}).state
    by_index = run(llamas["single"], "ties", {"density": 0.3, **INDEX_TIES}).state
    differ = sum(int((by_sort[n] != by_index[n]).sum()) for n in by_sort)
    total = sum(t.numel() for t in by_sort.values())
    assert 0 < differ < 0.01 * total


def test_tie_break_index_writes_no_mergekit_yaml(llamas, tmp_path):
    run(llamas["single"], "ties", {"density": 0.3, "scope": "tensor"}, tmp_path / "sort")
    run(llamas["single"], "ties", {"density": 0.3, **INDEX_TIES}, tmp_path / "index")
    assert (tmp_path / "sort" / "mergekit.yaml").is_file() and not (tmp_path / "index" / "mergekit.yaml").exists()


def test_sliced_tensor_trim_keeps_exactly_k():
    """The slice-by-slice trim of one model's task vector keeps exactly k entries, ties broken by index."""
    from merging_core.methods.ties_dare import trim_slice_
    delta = torch.tensor([0.5, -0.5, 0.25, 0.5, 0.0, -0.5, 0.125, 0.75])
    k = 3  # 0.75, then two of the four tied 0.5s: the first two
    thresholds, _, tied = streamed_thresholds(fake_model([[delta[:5]], [delta[5:]]], [torch.zeros(5), torch.zeros(3)],
                                                         chunk=2), k / 8)
    assert thresholds == [0.5] and tied == [2]
    left = list(tied)
    kept = torch.cat([trim_slice_(part.clone(), 0.5, left, 0) for part in delta.split(3)])
    assert kept.tolist() == [0.5, -0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.75]


@pytest.mark.parametrize("left", [1, 5, 17, 40])
def test_slice_split_where_the_kept_ties_run_out(monkeypatch, left):
    """A slice whose tied entries are kept only up to a point is cut there: the ranges' plain limits keep
    exactly what the index-order trim keeps, with the tie count carried on, found block by block."""
    from merging_core.methods import TensorJob
    from merging_core.methods.ties_dare import SliceTrim, _slice_ranges, _trim_ranges_, trim_slice_

    monkeypatch.setattr(ties_dare, "TIE_SCAN", 7)  # several blocks in one slice
    generator = torch.Generator().manual_seed(4)
    base = torch.zeros(2, 50)
    tensors = [(torch.randint(-3, 4, (2, 50), generator=generator) * 0.25).float() for _ in range(2)]
    tied = [int(((t - base).abs() == 0.5).sum()) for t in tensors]
    trim = SliceTrim([0.5, 0.5], [left, tied[1] + 5], tied=[[tied[0]], [tied[1]]])  # (model 1: every tie kept)
    job = TensorJob(name="p", info=None, tensors=tensors, weights=torch.ones(2), params={}, base=base)
    ranges = _slice_ranges(job, trim)
    trimmed = _trim_ranges_(torch.stack([t - base for t in tensors]), ranges)
    expected_left = [left]
    expected = trim_slice_((tensors[0] - base).clone(), 0.5, expected_left, 0)
    assert torch.equal(trimmed[0], expected) and trim.ties_left == [expected_left[0], 5]
    assert torch.equal(trimmed[1], (tensors[1] - base) * ((tensors[1] - base).abs() >= 0.5))
    assert len(ranges) == (1 if left >= tied[0] else 2)


def test_mapped_reads_equal_copied_reads_and_never_write_the_file(tmp_path):
    """A `mapped` read gives the values a copied read gives (whole tensors and slices, small ones copied);
    writing into it changes the tensor, not the file."""
    from merging_core.tensorio import SafetensorsFile

    state = {"big": torch.randn(1 << 19).bfloat16(), "small": torch.randn(100)}
    save_file(state, tmp_path / "m.safetensors")
    before = (tmp_path / "m.safetensors").read_bytes()
    reader = SafetensorsFile(tmp_path / "m.safetensors")
    for key, (start, stop) in [("big", (0, None)), ("big", (1000, 400_000)), ("small", (3, 50))]:
        mapped = reader.get(key, start, stop, mapped=True)
        assert torch.equal(mapped, reader.get(key, start, stop)), key
        mapped.add_(1)
    reader.prefetch("big", 10, 20_000)  # (a hint: the page cache, nothing to see)
    assert (tmp_path / "m.safetensors").read_bytes() == before
    assert torch.equal(reader.get("big"), state["big"])


def test_write_behind_keeps_order_and_raises_the_writers_error():
    """The writer thread writes in order, and its failure (a full disk) is raised to the merge."""
    from merging_core.tensorio import write_behind

    written = []
    write_behind(lambda name, t: written.append((name, int(t))), ((str(i), torch.tensor(i)) for i in range(20)))
    assert written == [(str(i), i) for i in range(20)]

    def fails(name, tensor):
        if name == "3":
            raise OSError(28, "No space left on device")
    with pytest.raises(OSError, match="No space"):
        write_behind(fails, ((str(i), torch.tensor(i)) for i in range(10)))


def test_lookahead_reads_ahead_within_its_budget(monkeypatch):
    """The prefetch thread is sent the tensors after the one the merge reached, up to `LOOKAHEAD` bytes
    ahead, each once."""
    plan, sent = prefetched_plan(monkeypatch, 6)
    ahead = synchronous_lookahead(plan)
    ahead.reached("t0")
    assert sent == ["t1", "t2"]  # 4000 bytes ahead
    ahead.reached("t1")
    assert sent == ["t1", "t2", "t3"]
    ahead.reached("t3")
    ahead.close()
    assert sent == ["t1", "t2", "t3", "t4", "t5"]


def test_lookahead_waits_for_the_tensor_reached():
    """The merge touches a tensor's pages only once the prefetch thread has read it: `reached` returns
    after that read, not before."""
    release, finished = threading.Event(), []

    class Model:
        def __init__(self):
            self.names = {"t0": "t0", "t1": "t1"}

        def meta(self, name):
            return torch.bfloat16, (10,)

        def prefetch(self, name, *_):
            release.wait(5)
            finished.append(name)

    plan = type("Plan", (), {"models": [Model()], "base": None})()
    ahead = engine._Lookahead(plan, ["t0", "t1"])
    ahead.reached("start")  # sends t0 and t1, waits for neither
    threading.Timer(0.3, release.set).start()
    ahead.reached("t1")
    assert finished == ["t0", "t1"]
    ahead.close()


def test_lookahead_head_start_while_the_kernels_load(monkeypatch):
    """At the start of a pass whose compiled kernels have not run yet in the process, the prefetch reads
    further ahead (the first call takes seconds); then, and in a process that has run them, `LOOKAHEAD`."""
    from merging_core.methods import fused

    plan, sent = prefetched_plan(monkeypatch, 8)
    monkeypatch.setattr(engine, "HEAD_START", 10_000)
    for loaded, compiled, first in [(False, True, 5), (True, True, 2), (False, False, 2)]:
        monkeypatch.setattr(fused, "_loaded", loaded)
        sent.clear()
        ahead = synchronous_lookahead(plan, compiled=compiled)
        ahead.reached("t0")
        assert sent == [f"t{i}" for i in range(1, 1 + first)], (loaded, compiled)
        ahead.reached("t1")  # within the head start: nothing more; past it, the usual budget
        assert sent[first:] == ([] if first > 2 else ["t3"]), (loaded, compiled)
        ahead.close()


def prefetched_plan(monkeypatch, count: int):
    """A plan of one model with tensors t0 ... t{count-1} of 2000 bytes each, `LOOKAHEAD` 4000 bytes, and the
    list of the tensors its prefetch is sent, in order."""
    sent: list[str] = []

    class Model:
        names = {f"t{i}": f"t{i}" for i in range(count)}

        def meta(self, name):
            return torch.bfloat16, (1000,)

        def prefetch(self, name, *_):
            sent.append(name)

    monkeypatch.setattr(engine, "_holders", lambda plan_, name: [0])
    monkeypatch.setattr(engine, "LOOKAHEAD", 4000)
    return type("Plan", (), {"models": [Model()], "base": None})(), sent


def synchronous_lookahead(plan, **options) -> engine._Lookahead:
    """`_Lookahead` over every tensor of `plan`, its thread pool replaced by one that runs each read when it
    is submitted."""
    def now(fn, *args) -> Future:
        done = Future()
        done.set_result(fn(*args))
        return done
    ahead = engine._Lookahead(plan, list(plan.models[0].names), **options)
    ahead.pool.shutdown()
    ahead.pool = type("Now", (), {"submit": lambda self, fn, *args: now(fn, *args),
                                  "shutdown": lambda self, **_: None})()
    return ahead


def released_spans(calls: list[tuple[str, int, int]], path: Path) -> list[tuple[int, int]]:
    """The byte ranges of `path` given to `posix_fadvise(DONTNEED)`, joined where they touch or overlap."""
    spans: list[list[int]] = []
    for start, stop in sorted((o, o + n) for f, o, n in calls if f == str(path)):
        if spans and start <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], stop)
        else:
            spans.append([start, stop])
    return [(a, b) for a, b in spans]


@pytest.mark.parametrize("method,params", [("ties", {"density": 0.3, "scope": "tensor"}), ("average", {})])
def test_merge_beyond_memory_releases_what_it_has_used(llamas, tmp_path, monkeypatch, method, params):
    """A merge whose inputs and output exceed the memory lets the page cache drop each input's bytes once
    merged, all of them and nothing else, and its output's as it goes; the result is the same. A merge
    that fits leaves the page cache alone."""
    calls: list[tuple[str, int, int]] = []
    fadvise = os.posix_fadvise

    def recorded(fd, offset, length, advice):
        assert advice == os.POSIX_FADV_DONTNEED
        calls.append((os.readlink(f"/proc/self/fd/{fd}"), offset, length))
        fadvise(fd, offset, length, advice)
    monkeypatch.setattr(os, "posix_fadvise", recorded)
    monkeypatch.setattr(engine, "CHUNK", 1000)  # the embedding in slices, each released
    run(llamas["sharded"], method, params, tmp_path / "fits", shard_size=SHARD)
    assert calls == []
    monkeypatch.setattr(engine, "memory_bytes", lambda: 100_000)
    monkeypatch.setattr(tensorio, "RELEASE_STEP", 4096)
    run(llamas["sharded"], method, params, tmp_path / "beyond", shard_size=SHARD)
    fits, beyond = tensors(tmp_path / "fits"), tensors(tmp_path / "beyond")
    assert fits.keys() == beyond.keys() and all(torch.equal(fits[k], beyond[k]) for k in fits)
    for who in ("a", "b", "base") if method == "ties" else ("a", "b"):
        for shard in sorted(Path(llamas["sharded"][who]).glob("*.safetensors")):
            entries = tensorio.SafetensorsFile(shard).entries
            data = [(o, o + math.prod(shape) * dtype.itemsize) for dtype, shape, o in entries.values()]
            assert released_spans(calls, shard) == [(min(a for a, _ in data), max(b for _, b in data))], shard
    outputs = sorted((tmp_path / "beyond").glob("*.safetensors"))
    assert len(outputs) > 2
    staged = {(Path(f).parent.name.startswith(".beyond"), Path(f).name): f for f, _, _ in calls}  # (written there)
    for shard in outputs:
        spans = released_spans(calls, Path(staged.get((True, shard.name), shard)))
        assert len(spans) == 1 and spans[0][0] == 0 and spans[0][1] > shard.stat().st_size - 3 * 4096, shard


@pytest.mark.gpu
@pytest.mark.parametrize("method,params", METHODS, ids=[f"{m}-{'-'.join(map(str, p.values()))}" for m, p in METHODS])
def test_gpu_streamed_merge_matches_the_cpu(llamas, monkeypatch, tmp_path, method, params):
    """The GPU path (page-locked reads, copies overlapped with the math), whole tensors and slices, writes
    what the CPU writes, up to float rounding and, in TIES, the tie order of the GPU's sort."""
    monkeypatch.setattr(engine, "CHUNK", 1000)
    monkeypatch.setattr(engine, "WHOLE", 10_000)
    run(llamas["sharded"], method, params, tmp_path / "cpu", device="cpu", shard_size=SHARD)
    run(llamas["sharded"], method, params, tmp_path / "gpu", device="cuda", shard_size=SHARD)
    cpu, gpu = tensors(tmp_path / "cpu"), tensors(tmp_path / "gpu")
    assert cpu.keys() == gpu.keys()
    for name in cpu:
        differ = (cpu[name].float() - gpu[name].float()).abs() > 2 ** -7 * cpu[name].float().abs() + 1e-6
        assert float(differ.float().mean()) < (0.01 if method == "ties" else 0.001), name


# -- compiled kernels and the one-pass band selection ----------------------------------------------------

FUSED_CASES = [{"density": 0.3}, {"density": 0.3, "zero_sign": "majority", "lambda": 0.7}, {"density": 1.0},
               {"density": 0.3, "scope": "tensor"}, {"density": 0.3, "scope": "tensor", "zero_sign": "total"},
               {"density": 0.3, **INDEX_TIES}, {"density": 0.05, "lambda": 1.3, **INDEX_TIES}]


@pytest.mark.parametrize("params", FUSED_CASES, ids=["-".join(map(str, p.values())) for p in FUSED_CASES])
def test_compiled_ties_equals_eager(llamas, monkeypatch, params):
    """TIES with its elementwise steps compiled into one loop (what a large CPU merge runs) gives the
    eager merge's values exactly, whole tensors and slices, every scope and tie rule."""
    from merging_core.methods import fused

    monkeypatch.setattr(engine, "CHUNK", 1000)
    monkeypatch.setattr(engine, "WHOLE", 10_000)  # the embedding in slices after a scan (tie_break index)
    eager = run(llamas["single"], "ties", params).state
    calls = []
    real = fused._call
    monkeypatch.setattr(fused, "_call", lambda name, *a: calls.append(name) or real(name, *a))
    monkeypatch.setattr(fused, "MIN_VALUES", 0)
    monkeypatch.setattr(fused, "SMALL", 0)  # every tensor through the compiled code
    monkeypatch.setattr(tensorio, "MAPPED_MIN", 0)  # every slice read in place, bf16, as a large merge reads it
    compiled = run(llamas["single"], "ties", params)
    # (a whole tensor whose zero-sign rule needs its trimmed total first stays eager)
    whole_total = params.get("scope") == "tensor" and params.get("zero_sign") == "total" and "tie_break" not in params
    assert fused.failure() is None and bool(calls) != whole_total, "the compiled kernels must run where they can"
    assert not compiled.notes
    for name in eager:
        assert torch.equal(compiled.state[name], eager[name]), name


@pytest.mark.parametrize("parallel", [False, True])
def test_slerp_in_blocks_equals_the_whole_tensor_expression(monkeypatch, parallel):
    """SLERP on the CPU takes bf16 inputs as stored and interpolates a block at a time, writing bf16: the
    bits of the float32 expression on the whole tensors rounded once, for the angle's weights and for the
    linear interpolation of (anti)parallel tensors; the inputs left as they were."""
    from merging_core.methods import linear

    generator = torch.Generator().manual_seed(0)
    a = torch.randn(70, 143, generator=generator).bfloat16()
    b = (-2 * a) if parallel else torch.randn(70, 143, generator=generator).bfloat16()
    kept = a.clone(), b.clone()
    monkeypatch.setattr(linear, "BLOCK", 1000)  # 10,010 values: ten full blocks and a short one
    job = ml.methods.TensorJob("w", ml.arch.ParamInfo("w", "attention", "query", 0), [a, b], torch.full((2,), 0.5),
                               ml.methods.get_method("slerp").parse({"t": 0.3}), context={"raw_inputs": True})
    merged = linear.slerp(job)
    x, y = a.double().flatten(), b.double().flatten()
    cosine = float(x @ y / (x.norm() * y.norm()))
    coefficients = linear.slerp_coefficients(cosine, job.params)
    assert (coefficients is None) == parallel
    if parallel:
        expected = 0.7 * a.float() + 0.3 * b.float()
    else:
        expected = (a.float() * coefficients[0]).add_(b.float(), alpha=coefficients[1])
    assert merged.dtype == torch.bfloat16 and merged.shape == a.shape
    assert torch.equal(merged, expected.bfloat16())
    assert torch.equal(a, kept[0]) and torch.equal(b, kept[1])


def test_slerp_reads_its_inputs_as_stored(llamas, monkeypatch):
    """A SLERP merge on the CPU gets every tensor as stored (bf16; the large ones mapped from the file), not
    copied to float32 by the reader; its output equals that of float32 inputs within a bf16 rounding flip
    (the angle's sums in float32 blocks of other lengths)."""
    dtypes, modes = set(), []
    original, real_reader = ml.methods.METHODS["slerp"], engine._reader

    def spy(job):
        dtypes.update(t.dtype for t in job.tensors)
        return original.merge_tensor(job)

    def reader(plan, device, raw=False):
        modes.append(raw)
        return real_reader(plan, device, raw=raw)

    monkeypatch.setattr(engine, "_reader", reader)
    monkeypatch.setitem(ml.methods.METHODS, "slerp", dataclasses.replace(original, merge_tensor=spy))
    stored = run(llamas["single"], "slerp", {"t": 0.3}).state
    assert dtypes == {torch.bfloat16} and set(modes) == {True}
    monkeypatch.setitem(ml.methods.METHODS, "slerp", dataclasses.replace(original, merge_tensor=spy, raw_inputs=None))
    dtypes.clear()
    converted = run(llamas["single"], "slerp", {"t": 0.3}).state
    assert dtypes == {torch.float32}
    for name in stored:
        assert stored[name].dtype == converted[name].dtype == torch.bfloat16
        differ = (stored[name].float() - converted[name].float()).abs()
        assert bool((differ <= 2 ** -7 * converted[name].float().abs()).all()), name


def test_compiled_kernel_with_three_models_and_zero_sums(monkeypatch):
    """The kernel on three task vectors (the sums' order matters in float32), entries that cancel to an
    elected sum of 0, zeros, and every limit kind (none, strict, at a tie): the eager expression exactly."""
    from merging_core.methods import fused

    monkeypatch.setattr(fused, "SMALL", 0)
    from merging_core.methods.ties_dare import below

    generator = torch.Generator().manual_seed(3)
    base = torch.randn(5000, generator=generator).bfloat16().float()
    tensors = [(base + 0.01 * torch.randn(5000, generator=generator)).bfloat16().float() for _ in range(3)]
    tensors[1][:100] = base[:100] + (base[:100] - tensors[0][:100])  # +a and -a: an elected sum of 0
    tensors[2][100:200] = base[100:200]  # no change
    magnitude = (tensors[0] - base).abs()
    limits = [-math.inf, 0.004, below(float(magnitude.kthvalue(4000).values))]
    for lam, fallback in ((1.0, 1.0), (0.6, -1.0)):
        eager = fused.ties_combine(base, tensors, limits, lam, fallback, compiled=False)
        assert torch.equal(fused.ties_combine(base, tensors, limits, lam, fallback), eager)
    assert fused.failure() is None


def spread_sample(models, bases, blocks: int, block: int):
    """A scan's `sample`: `blocks` evenly spaced blocks of one parameter's values, and its size."""
    from merging_core.methods import TensorJob

    flat = [t.flatten() for t in models[0]]
    base = bases[0].flatten()
    step = base.numel() // blocks
    pick = torch.cat([torch.arange(i * step, i * step + min(block, step)) for i in range(blocks)])
    return lambda: (TensorJob(name="p0", info=None, tensors=[t[pick] for t in flat], weights=torch.ones(2),
                              params={}, base=base[pick]), base.numel())


def slice_jobs(models, bases, chunk: int):
    from merging_core.methods import TensorJob

    model = fake_model([models[0]], [bases[0]], chunk)

    def slices():
        for name, _, tensors_, base in model.tensors():
            yield TensorJob(name=name, info=None, tensors=tensors_, weights=torch.ones(2), params={}, base=base)
    return slices


@pytest.mark.parametrize("density", [0.001, 0.2, 0.5, 0.999])
@pytest.mark.parametrize("tied", [False, True])
def test_band_selection_is_exact_in_one_pass(density, tied):
    """The scan of one large tensor finds from a spread sample and one pass the radix selection's exact
    threshold and tie count per model, and how many tied entries each slice holds (two passes where the
    sample holds a wide tie that turns out not to be the threshold: a counting pass refutes it first)."""
    from merging_core.methods.ties_dare import band_select

    generator = torch.Generator().manual_seed(7)
    base = torch.randn(200, 300, generator=generator).bfloat16().float()
    step = 2 ** -6 if tied else 0.01  # coarse steps: thousands of entries share each magnitude
    models = [[(base + (step * torch.randn(base.shape, generator=generator)).round() * (1 if tied else 0)
                + (0 if tied else step * torch.randn(base.shape, generator=generator))).bfloat16().float()
               for _ in range(2)]]
    slices = slice_jobs(models, [base], chunk=7000)
    reads = []
    counted = lambda: reads.append(1) or slices()  # noqa: E731
    trim = band_select(counted, density, spread_sample(models, [base], blocks=16, block=1000))
    assert trim is not None and len(reads) <= 2
    thresholds, _, tied_left = streamed_thresholds(fake_model(models, [base], chunk=7000), density)
    assert trim.thresholds == thresholds and trim.ties_left == tied_left
    for i, t in enumerate(models[0]):
        magnitude = (t - base).flatten()
        per_slice = [int((part.abs() == thresholds[i]).sum()) for part in magnitude.split(7000)]
        assert trim.tied[i] == per_slice


def bf16_task_vectors(seed: int, shape=(300, 400)):
    """A bf16 base and two fine-tunes of it, as a hub checkpoint holds them: |τ| is a small multiple of the
    base weights' spacing, so thousands of entries share each magnitude."""
    generator = torch.Generator().manual_seed(seed)
    base = (0.02 * torch.randn(shape, generator=generator)).bfloat16().float()
    return base, [(base + 0.0002 * torch.randn(shape, generator=generator)).bfloat16().float() for _ in range(2)]


@pytest.mark.parametrize("density", [0.2, 0.6])
def test_tied_threshold_is_proven_by_one_counting_pass(monkeypatch, density):
    """On bf16 task vectors the sample's value at rank k is the threshold, and one pass that only counts
    (no band of magnitudes kept) proves it: the radix selection's threshold, tie count and per-slice ties."""
    from merging_core.methods import fused
    from merging_core.methods.ties_dare import band_select

    base, tensors = bf16_task_vectors(9)
    monkeypatch.setattr(fused, "band", lambda *a, **k: pytest.fail("the band pass ran"))
    slices = slice_jobs([tensors], [base], chunk=7000)
    reads = []
    trim = band_select(lambda: reads.append(1) or slices(), density,
                       spread_sample([tensors], [base], blocks=256, block=64))
    thresholds, _, tied_left = streamed_thresholds(fake_model([tensors], [base], chunk=7000), density)
    assert len(reads) == 1 and trim.thresholds == thresholds and trim.ties_left == tied_left
    assert trim.tied == [[int(((t - base).flatten()[i:i + 7000].abs() == thresholds[m]).sum())
                          for i in range(0, base.numel(), 7000)] for m, t in enumerate(tensors)]


def test_counts_are_exact_across_blocks(monkeypatch):
    """The kernels count in float32, exactly below `EXACT_COUNT` entries: longer slices go in blocks, and
    the counts, the kept sums and the elected-sign votes equal the integer and float64 ones."""
    from merging_core.methods import fused

    base, tensors = bf16_task_vectors(11)
    magnitudes = [(t - base).abs().flatten() for t in tensors]
    values = [float(m.kthvalue(m.numel() // 2).values) for m in magnitudes]  # bf16 values, tied by the hundreds
    kept = [(t - base).flatten() * (m >= v) for t, m, v in zip(tensors, magnitudes, values)]
    expected = [(int((m > v).sum()), int((m == v).sum())) for m, v in zip(magnitudes, values)]
    assert all(equal > 100 for _, equal in expected)
    monkeypatch.setattr(fused, "EXACT_COUNT", 1000)  # 120 blocks
    monkeypatch.setattr(fused, "SMALL", 0)
    for compiled in (False, True):
        counts, votes = fused.trim_tally(base, tensors, values, votes=True, compiled=compiled)
        assert [(above, equal) for above, equal, _ in counts] == expected
        assert [s for *_, s in counts] == pytest.approx([float(k.double().sum()) for k in kept], rel=1e-9)
        assert votes == float((kept[0] + kept[1]).sign().sum())
        assert fused.tie_counts(base, tensors, values, compiled=compiled) == expected


def test_counting_pass_refutes_a_wrong_guess():
    """A guessed threshold one step off the k-th largest is refused (no trim), the right one accepted."""
    from merging_core.methods.ties_dare import tie_select

    base, tensors = bf16_task_vectors(10)
    slices = slice_jobs([tensors], [base], chunk=7000)
    k = int(0.2 * base.numel())
    thresholds, _, tied_left = streamed_thresholds(fake_model([tensors], [base], chunk=7000), 0.2)
    magnitudes = [(t - base).abs().flatten() for t in tensors]
    next_up = [float(m[m > v].min()) for m, v in zip(magnitudes, thresholds)]
    assert tie_select(slices, k, next_up) is None
    assert tie_select(slices, k, [thresholds[0], next_up[1]]) is None
    assert tie_select(slices, k, thresholds).ties_left == tied_left


def test_band_selection_gives_way_when_the_sample_misleads():
    """A sample unlike the tensor (here: its first rows, whose task vector is ten times smaller) places
    the band wrongly: the selection says so, and the scan falls back on the radix passes, still exact."""
    from merging_core.methods.ties_dare import _tensor_scan, band_select

    generator = torch.Generator().manual_seed(8)
    base = torch.randn(100, 400, generator=generator)
    scale = torch.ones(100, 1)
    scale[:10] = 0.1
    models = [[base + 0.01 * scale * torch.randn(base.shape, generator=generator) for _ in range(2)]]
    slices = slice_jobs(models, [base], chunk=4000)
    head = spread_sample(models, [base], blocks=1, block=4000)  # rows 0-9 only
    assert band_select(slices, 0.2, head) is None
    context = _tensor_scan(slices, {"density": 0.2, "zero_sign": "plus"}, head)
    thresholds, _, tied_left = streamed_thresholds(fake_model(models, [base], chunk=4000), 0.2)
    assert context["tensor_trim"].thresholds == thresholds and context["tensor_trim"].ties_left == tied_left


def test_without_a_compiler_the_merge_goes_on_eagerly(llamas, monkeypatch):
    """Where the kernels cannot be compiled (no C++ compiler), the merge runs the eager code, gives the
    same values, and its notes say so."""
    from merging_core.methods import fused

    eager = run(llamas["single"], "ties", {"density": 0.3}).state

    def no_compiler(fn, **_):
        def fails(*args):
            raise RuntimeError("no C++ compiler found\nsecond line")
        return fails

    monkeypatch.setattr(fused, "MIN_VALUES", 0)
    monkeypatch.setattr(fused, "SMALL", 0)  # every tensor through the compiled code
    monkeypatch.setattr(fused, "_compiled", {})
    monkeypatch.setattr(fused, "_failure", None)
    monkeypatch.setattr(fused.torch, "compile", no_compiler)
    result = run(llamas["single"], "ties", {"density": 0.3})
    assert fused.failure() == "RuntimeError: no C++ compiler found"
    assert result.notes == ["compiled kernels unavailable here (RuntimeError: no C++ compiler found); merged with "
                            "eager PyTorch"]
    assert all(torch.equal(result.state[name], eager[name]) for name in eager)
    assert not fused.wanted(torch.device("cpu"), 1 << 40)  # and the process does not try again


def fused_run(llamas, monkeypatch, params: dict):
    """A TIES merge of the tiny Llamas as a large CPU merge runs it: compiled kernels, every slice read in
    place."""
    from merging_core.methods import fused

    monkeypatch.setattr(fused, "MIN_VALUES", 0)
    monkeypatch.setattr(fused, "SMALL", 0)  # every tensor through the compiled code
    monkeypatch.setattr(tensorio, "MAPPED_MIN", 0)
    return run(llamas["single"], "ties", params).state


MODEL_CASES = [{"density": 0.3}, {"density": 0.3, "zero_sign": "majority", "lambda": 0.7},
               {"density": 1.0}, {"density": 1.0, "zero_sign": "majority"}, {"density": 0.3, "zero_sign": "plus"}]


@pytest.mark.parametrize("params", MODEL_CASES, ids=["-".join(map(str, p.values())) for p in MODEL_CASES])
def test_model_threshold_proven_by_one_compiled_pass(llamas, monkeypatch, params):
    """Scope model with compiled kernels: the threshold a spread sample guesses (bf16 ties) is proven by one
    counting pass over the inputs as stored, backwards, which also sums what the zero-sign rule needs; the
    radix passes never run, and the merge equals the eager one exactly."""
    monkeypatch.setattr(engine, "CHUNK", 1000)  # the embedding in slices
    forward, backward = [], []
    eager_pass, stored_pass = engine._method_tensors, engine._method_stored
    monkeypatch.setattr(engine, "_method_tensors", lambda *a: (forward.append(p[0]) or p for p in eager_pass(*a)))
    eager = run(llamas["single"], "ties", params).state
    monkeypatch.setattr(engine, "_method_stored", lambda *a: (backward.append(p) or p for p in stored_pass(*a)))
    monkeypatch.setattr(ties_dare, "streamed_thresholds", lambda *a: pytest.fail("the radix passes ran"))
    monkeypatch.setattr(engine, "_method_tensors", lambda *a: pytest.fail("an eager pass ran"))
    compiled = fused_run(llamas, monkeypatch, params)
    assert all(torch.equal(compiled[name], eager[name]) for name in eager)
    if params.get("zero_sign") == "plus" and params["density"] == 1:
        assert not backward and not forward  # nothing to find: no pass
        return
    names = list(dict.fromkeys(name for name, *_ in backward))
    assert names and names == list(dict.fromkeys(forward[::-1]))  # every parameter of the eager pass, backwards
    assert {t.dtype for _, _, tensors, _ in backward for t in tensors} == {torch.bfloat16}  # as stored


def test_refuted_model_threshold_falls_back_to_the_radix_passes(llamas, monkeypatch):
    """A guess one step off (too high for one model) is refuted by the counting pass; the radix passes then
    find the thresholds, and the merge equals the eager one."""
    monkeypatch.setattr(engine, "CHUNK", 1000)
    eager = run(llamas["single"], "ties", {"density": 0.3}).state
    real_guesses, real_select = ties_dare.sampled_guesses, ties_dare.streamed_thresholds
    radix = []
    monkeypatch.setattr(ties_dare, "sampled_guesses", lambda *a: [
        value * 1.01 if i == 0 else value for i, value in enumerate(real_guesses(*a))])
    monkeypatch.setattr(ties_dare, "streamed_thresholds", lambda *a: radix.append(1) or real_select(*a))
    compiled = fused_run(llamas, monkeypatch, {"density": 0.3})
    assert radix == [1]
    assert all(torch.equal(compiled[name], eager[name]) for name in eager)


def test_weighted_tied_guess():
    """A sample whose values stand for different numbers of entries: the guess is the value at weighted
    rank k, tried only when it holds at least `TIED` of the weight."""
    magnitude = torch.tensor([5.0] * 20 + [3.0] * 20 + [1.0] * 20)
    weights = torch.tensor([1.0] * 20 + [1.0] * 20 + [10.0] * 20, dtype=torch.float64)  # n = 240
    assert ties_dare._tied_guess(magnitude, 30, 240, weights) == 3.0
    assert ties_dare._tied_guess(magnitude, 41, 240, weights) == 1.0
    assert ties_dare._tied_guess(magnitude, 41, 240) == 5.0  # unweighted, rank 10 of the 60 values


def test_small_tensors_skip_the_compiled_code(monkeypatch):
    """Under `SMALL` values a kernel's expression runs eagerly (no compiling for small sizes): the same
    values, and nothing compiled."""
    from merging_core.methods import fused

    monkeypatch.setattr(fused, "_kernel", lambda *a: pytest.fail("compiled for a small tensor"))
    x = torch.randn(100)
    args = (x, [x + 1, x - 1], [0.5, 0.5], 1.0, 1.0)
    assert torch.equal(fused.ties_combine(*args), fused.ties_combine(*args, compiled=False))
    assert fused.failure() is None


def test_spread_sample_cut_from_one_mapping_equals_block_reads(llamas, monkeypatch):
    """Reading in place a tensor the prefetch has cached, a spread sample is cut from one mapping of each
    input (no small reads): the same values as the blocks read one by one."""
    from merging_core.checkpoint import open_checkpoint
    from merging_core.spec import GROUPS

    layout = llamas["single"]
    models = [open_checkpoint(layout[who]) for who in ("a", "b")]
    plan = engine._plan(ml.methods.get_method("ties"), {"density": 0.3}, models, open_checkpoint(layout["base"]),
                        GROUPS, "average", "auto")
    name = next(n for n in engine._method_names(plan) if "embed" in n)  # 16,384 values
    monkeypatch.setattr(tensorio, "MAPPED_MIN", 0)
    cpu = torch.device("cpu")
    read = engine._reader(plan, cpu, raw=True)
    blocks = []

    def counted(piece):
        blocks.append(piece)
        return read(piece)
    one_by_one, size = engine._spread(plan, name, 8, 100, counted, cpu)
    assert len(blocks) == 8 and size == 16_384
    blocks.clear()
    cut, _ = engine._spread(plan, name, 8, 100, counted, cpu, cached=True)
    assert len(blocks) == 1 and blocks[0].stop == 16_384  # one mapping of the whole tensor
    assert all(torch.equal(x, y) for x, y in zip(cut.tensors + [cut.base], one_by_one.tensors + [one_by_one.base]))
    assert cut.tensors[0].numel() == 800
