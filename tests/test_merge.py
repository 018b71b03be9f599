"""Merge methods: invariants of every method, the engine's components/heads/outputs, and its errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import merging_core as ml
from merging_core.errors import MergeLabError
from merging_core.merge import merge, merge_from_config
from merging_core.methods import METHODS, TensorJob, WholeModel, get_method
from merging_core.methods.ties_dare import kth_largest

from .conftest import make_pico
from .helpers import DEVICES, assert_close

# The parameters under which one model (or N copies) must come back unchanged are declared by each
# method itself: `METHODS[name].neutral`.
STATS = {"stats_tasks": ["sst2"]}


def weights(folder) -> dict[str, torch.Tensor]:
    return {k.removeprefix("bert."): v for k, v in load_file(folder / "model.safetensors").items()}


@pytest.fixture(scope="module")
def sst2_models(pico):
    return [str(pico("sst2", s)) for s in (0, 1, 2)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_one_model_or_copies_come_back(method, device, sst2_models, tmp_path, monkeypatch):
    monkeypatch.setenv("MERGELAB_DEVICE", device)  # where the data-aware methods' statistics are computed
    a = sst2_models[0]
    # sums of task vectors (task arithmetic, linear DARE) come back for one model; the rest for copies too
    copies = {"slerp": [a, a], "task_arithmetic": [a], "dare": [a]}.get(method, [a, a, a])
    result = merge(method, copies, base=sst2_models[1], params=dict(METHODS[method].neutral), out=tmp_path / "m",
                   stats_tasks=["sst2"] if METHODS[method].family == "data-aware" else None, device=device)
    atol = 1e-4 if method == "mats" else 1e-6
    assert_close(weights(tmp_path / "m"), weights(ml.resolve(a).path), atol=atol, rtol=1e-5)
    assert result.tasks == ["sst2"]


@pytest.mark.parametrize("device", DEVICES)
def test_task_arithmetic_lambda_zero_is_the_base(device, sst2_models, tmp_path):
    merge("task_arithmetic", sst2_models[:2], base=sst2_models[2], params={"lambda": 0}, out=tmp_path / "m",
          device=device)
    assert_close(weights(tmp_path / "m"), weights(ml.resolve(sst2_models[2]).path), atol=1e-6, rtol=1e-5)


def test_task_arithmetic_is_base_plus_scaled_task_vectors(sst2_models):
    a, b, base = (weights(ml.resolve(m).path) for m in sst2_models)
    state = merge("task_arithmetic", sst2_models[:2], base=sst2_models[2], params={"lambda": 0.4}).state
    for k in a:
        assert_close(state[k], base[k] + 0.4 * ((a[k] - base[k]) + (b[k] - base[k])), atol=1e-6, rtol=1e-5, msg=k)


def test_weighted_average(sst2_models):
    a, b = (weights(ml.resolve(m).path) for m in sst2_models[:2])
    state = merge("average", sst2_models[:2], params={"weights": "3,1"}).state
    for k in a:
        assert_close(state[k], 0.75 * a[k] + 0.25 * b[k], atol=1e-6, rtol=1e-5, msg=k)


def _job(tensors, stats=None, base=None, **params):
    method = params.pop("method")
    spec = get_method(method)
    info = ml.arch.ParamInfo("w", "attention", "query", 0)
    n = len(tensors)
    weights = torch.full((n,), 1 / n, device=tensors[0].device)  # on the merge device, as the engine's
    return spec, TensorJob("w", info, tensors, weights, spec.parse(params), base=base, stats=stats)


def _to(device, value):
    """Tensors, lists and dicts of tensors moved to `device` (the inputs of a per-tensor job)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to(device, v) for k, v in value.items()}
    return [_to(device, v) for v in value]


def _spd(d, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * d, d, generator=g)
    return x.T @ x / (3 * d)


@pytest.mark.parametrize("device", DEVICES)
def test_regmean_identical_grams_is_the_average(device):
    ws = _to(device, [torch.randn(5, 4) for _ in range(3)])
    gram = _spd(4, 0)
    stats = _to(device, [{"gram": gram, "gram_count": torch.tensor(10.0)}] * 3)
    spec, job = _job(ws, stats, method="regmean", alpha=1.0)
    assert_close(spec.merge_tensor(job), torch.stack(ws).mean(0), atol=1e-5, rtol=1e-5)


def test_regmean_alpha_zero_is_gram_diagonal_weighted_average():
    ws = [torch.randn(5, 4) for _ in range(2)]
    grams = [_spd(4, 1), _spd(4, 2)]
    spec, job = _job(ws, [{"gram": g, "gram_count": torch.tensor(7.0)} for g in grams], method="regmean", alpha=0.0)
    d = torch.stack([g.diagonal() for g in grams])  # (models, d_in): one weight per input feature
    expected = (torch.stack(ws) * d[:, None, :]).sum(0) / d.sum(0)
    assert_close(spec.merge_tensor(job), expected, atol=1e-5, rtol=1e-5)


def test_regmean_closed_form_matches_definition():
    ws = [torch.randn(6, 4) for _ in range(2)]
    grams = [_spd(4, 3), _spd(4, 4)]
    spec, job = _job(ws, [{"gram": g, "gram_count": torch.tensor(1.0)} for g in grams], method="regmean", alpha=1.0)
    merged = spec.merge_tensor(job)
    # RegMean minimises Σ_i ||X_i W^T - X_i W_i^T||²: the gradient Σ_i G_i (W^T - W_i^T) vanishes
    gradient = sum(g.double() @ (merged.double().T - w.double().T) for g, w in zip(grams, ws))
    assert gradient.abs().max() < 1e-5


def test_regmean_on_a_gram_with_dead_features_solves_the_rest_and_takes_the_mean_there():
    """Input features no example reaches (dead ReLU units: zero rows and columns of every Gram) leave
    RegMean's objective flat there: the merge is the pseudo-inverse's least-squares solution on the Gram's
    range plus the models' mean along its null space, here found by solving the live features directly."""
    from merging_core.methods.regmean import solve_regmean

    ws = [torch.randn(5, 6, dtype=torch.float64) for _ in range(3)]
    x = [torch.randn(20, 6, dtype=torch.float64) for _ in range(3)]
    for xi in x:
        xi[:, [1, 4]] = 0.0  # features 1 and 4: never reached
    grams = [xi.T @ xi for xi in x]
    report: dict = {}
    merged = solve_regmean(grams, ws, report)
    lhs, mean = sum(grams), torch.stack(ws).mean(0)
    inverse = torch.linalg.pinv(lhs, hermitian=True)
    null = torch.eye(6, dtype=torch.float64) - inverse @ lhs
    expected = (inverse @ sum(g @ w.T for g, w in zip(grams, ws)) + null @ mean.T).T
    assert report["singular_gram"]
    assert_close(merged, expected, atol=1e-6)
    assert_close(merged[:, [1, 4]], mean[:, [1, 4]], atol=1e-6)  # the dead columns: the models' mean
    assert not torch.allclose(merged, mean, atol=1e-3)  # the live ones are solved, not averaged
    assert_close(solve_regmean(grams, [ws[0]] * 3, {}), ws[0], atol=1e-6)  # copies of one model: itself


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("objective", ["regmean", "kfac", "diagonal_fisher", "average"])
def test_mats_conjugate_gradient_converges(objective, device):
    ws = _to(device, [torch.randn(6, 4) for _ in range(3)])
    stats = _to(device, [{"gram": _spd(4, i), "gram_count": torch.tensor(1.0), "grad_gram": _spd(6, 10 + i),
                          "fisher": torch.rand(6, 4) + 0.1} for i in range(3)])
    spec, job = _job(ws, stats, method="mats", objective=objective, init="average", iterations=500, tolerance=1e-12)
    merged = spec.merge_tensor(job)
    if objective == "average":
        # A = I and b = the mean: init="average" is already the solution, up to the float32 rounding of
        # the initial mean against the float64 right-hand side (a relative residual of ~1e-8)
        assert job.report["residual_before"] < 1e-6 and job.report["residual_after"] < 1e-6
        assert_close(merged, torch.stack(ws).mean(0), atol=1e-6)
        # at tolerance 1e-12 one step corrects that rounding; at any tolerance above it, none is taken
        assert job.report["steps"] <= 1
        _, loose = _job(ws, stats, method="mats", objective=objective, init="average", iterations=500, tolerance=1e-6)
        assert_close(spec.merge_tensor(loose), torch.stack(ws).mean(0), atol=1e-6)
        assert loose.report["steps"] == 0 and loose.report["residual_after"] < 1e-6
    else:
        assert job.report["residual_after"] < 1e-6 < job.report["residual_before"]
    if objective == "regmean":
        rm_spec, rm_job = _job(ws, stats, method="regmean", alpha=0.9)
        assert_close(merged, rm_spec.merge_tensor(rm_job), atol=1e-5, rtol=1e-5)
    if objective == "diagonal_fisher":
        f = torch.stack([s["fisher"] for s in stats])
        assert_close(merged, (f * torch.stack(ws)).sum(0) / f.sum(0), atol=1e-5, rtol=1e-5)


def test_fisher_with_equal_fishers_is_the_average_and_weights_entries():
    ws = [torch.tensor([1.0, 1.0]), torch.tensor([3.0, 3.0])]
    spec, job = _job(ws, [{"fisher": torch.tensor([1.0, 1.0])}, {"fisher": torch.tensor([1.0, 3.0])}], method="fisher")
    assert_close(spec.merge_tensor(job), torch.tensor([2.0, 2.5]), atol=1e-8, rtol=1e-5)  # allclose's defaults


def test_ties_model_scope_follows_the_paper():
    base = torch.zeros(6)
    t1 = torch.tensor([5.0, -1.0, 0.2, 4.0, 0.0, 0.0])
    t2 = torch.tensor([3.0, 2.0, 0.1, -6.0, 0.0, 0.0])
    spec, job = _job([t1, t2], base=base, method="ties", density=0.5, scope="model", **{"lambda": 1.0})
    job.context = spec.prepare(WholeModel(["w"], lambda: iter([("w", job.info, [t1, t2], base)])), job.params)
    # top 3 by magnitude: t1 keeps 5, 4, -1; t2 keeps 3, -6, 2. Elected: +, + (−1+2), −(4−6)
    assert_close(spec.merge_tensor(job), torch.tensor([4.0, 2.0, 0.0, -6.0, 0.0, 0.0]), atol=1e-8, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_radix_select_is_the_sorted_kth_largest(dtype):
    g = torch.Generator().manual_seed(0)
    for n, scale in [(70_001, 1e-6), (300_000, 1e-2), (300_000, 30.0)]:
        magnitude = (torch.randn(n, generator=g) * scale).abs().to(dtype)
        magnitude[:500] = 0  # zeros and ties, as in sparse and half-precision task vectors
        ranked = torch.sort(magnitude.float(), descending=True).values
        for k in (1, 13, n // 5, n - 1, n):
            assert float(kth_largest(magnitude, k)) == float(ranked[k - 1])


def test_dare_is_reproducible_and_rescales(sst2_models):
    one = merge("dare", sst2_models[:2], base=sst2_models[2], params={"drop_rate": 0.5, "seed": 3}).state
    two = merge("dare", sst2_models[:2], base=sst2_models[2], params={"drop_rate": 0.5, "seed": 3}).state
    other = merge("dare", sst2_models[:2], base=sst2_models[2], params={"drop_rate": 0.5, "seed": 4}).state
    key = "encoder.layer.0.attention.self.query.weight"
    assert torch.equal(one[key], two[key]) and not torch.equal(one[key], other[key])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_no_nan_on_different_task_models(method, device, pico, tmp_path, monkeypatch):
    monkeypatch.setenv("MERGELAB_DEVICE", device)  # statistics and the evaluation below
    models = [str(pico("sst2", 0)), str(pico("cola", 1))]
    params = {k: v for k, v in METHODS[method].neutral.items() if k == "examples"}
    merge(method, models, base=str(pico(None, 5)), params=params, out=tmp_path / "m",
          stats_tasks=["sst2", "cola"] if METHODS[method].family == "data-aware" else None, device=device)
    for name, t in weights(tmp_path / "m").items():
        assert torch.isfinite(t).all(), name
    for task in ("sst2", "cola"):
        assert ml.evaluate(str(tmp_path / "m"), task, limit=8)["n"] == 8


def test_different_tasks_keep_their_heads(pico, tmp_path):
    a, c = str(pico("sst2", 0)), str(pico("cola", 1))
    result = merge("average", [a, c], out=tmp_path / "m")
    assert result.tasks == ["cola", "sst2"]
    meta = json.loads((tmp_path / "m" / "mergelab.json").read_text())
    assert sorted(meta["heads"]) == ["cola", "sst2"]
    cola_head = load_file(tmp_path / "m" / "heads" / "cola.safetensors")
    own_head = load_file(ml.resolve(c).path / "model.safetensors")["classifier.weight"]
    assert_close(cola_head["classifier.weight"], own_head, atol=0, rtol=0)
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(tmp_path / "m")  # the encoder alone is a plain HF model
    assert encoder.config.hidden_size == 32
    with pytest.raises(MergeLabError, match="heads for"):
        ml.evaluate(str(tmp_path / "m"), "mrpc", limit=4)


def test_same_label_set_merges_heads_into_one_loadable_model(sst2_models, tmp_path):
    merge("average", sst2_models[:2], out=tmp_path / "m")
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m")
    a, b = (weights(ml.resolve(m).path) for m in sst2_models[:2])
    assert_close(model.classifier.weight, (a["classifier.weight"] + b["classifier.weight"]) / 2, atol=1e-8, rtol=1e-5)


@pytest.mark.parametrize("fallback", ["average", "first"])
def test_components_limit_the_method(sst2_models, fallback):
    a, b, base = (weights(ml.resolve(m).path) for m in sst2_models)
    state = merge("task_arithmetic", sst2_models[:2], base=sst2_models[2], params={"lambda": 1.0},
                  components=["attention"], fallback=fallback).state
    q, ff = "encoder.layer.1.attention.self.query.weight", "encoder.layer.1.intermediate.dense.weight"
    assert_close(state[q], a[q] + b[q] - base[q], atol=1e-6, rtol=1e-5)
    assert_close(state[ff], a[ff] if fallback == "first" else (a[ff] + b[ff]) / 2, atol=1e-6, rtol=1e-5)


def test_merge_config_recreates_the_merge(sst2_models, tmp_path):
    merge("dare", sst2_models[:2], base=sst2_models[2], params={"drop_rate": 0.3, "seed": 7}, out=tmp_path / "m")
    config = json.loads((tmp_path / "m" / "merge_config.json").read_text())
    assert config["params"]["seed"] == 7 and config["base"] == sst2_models[2]
    merge_from_config(tmp_path / "m", tmp_path / "again")
    assert_close(weights(tmp_path / "again"), weights(tmp_path / "m"), atol=0, rtol=0)


def test_streamed_file_equals_a_regular_save(sst2_models, tmp_path):
    merge("average", sst2_models[:2], out=tmp_path / "m")
    state = merge("average", sst2_models[:2]).state
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "ref.safetensors")
    ours = weights(tmp_path / "m")
    assert_close(ours, {k: v for k, v in load_file(tmp_path / "ref.safetensors").items()}, atol=0, rtol=0)


def test_statistics_are_cached_and_shareable(pico, tmp_path, monkeypatch):
    a, c = str(pico("sst2", 0)), str(pico("cola", 1))
    first = merge("regmean", [a, c], params={"examples": 8})
    calls = []
    real = ml.stats.compute_parts
    monkeypatch.setattr(ml.stats, "compute_parts", lambda *args, **kw: calls.append(args) or real(*args, **kw))
    again = merge("regmean", [a, c], params={"examples": 8})
    assert calls == []  # served from the cache
    assert_close(again.state, first.state, atol=0, rtol=0)
    files = [ml.stats.cache_path(ml.stats.record(ml.resolve(m), ml.get_task(t), "gram", {**ml.stats.DEFAULTS, "examples": 8}))
             for m, t in ((a, "sst2"), (c, "cola"))]
    shared = merge("regmean", [a, c], params={"examples": 8}, stats_files=[str(f) for f in files])
    assert_close(shared.state, first.state, atol=0, rtol=0)
    record = json.loads(files[0].with_suffix(".json").read_text())
    assert record["kind"] == "gram" and record["examples"] == 8 and record["task"] == "sst2"


@pytest.mark.parametrize("call, message", [
    (lambda m, t: merge("task_arithmetic", m[:2]), "^base: .*give the model they were fine-tuned from"),
    (lambda m, t: merge("slerp", m[:1]), "exactly 2 models"),
    (lambda m, t: merge("ties", m[:2], base=m[2], params={"dencity": 0.2}), "no parameter 'dencity'"),
    (lambda m, t: merge("ties", m[:2], base=m[2], params={"density": 1.5}), r"must be in \[0.0, 1.0\]"),
    (lambda m, t: merge("average", m[:2], params={"weights": "1,2,3"}), "one per model"),
    (lambda m, t: merge("magic", m[:2]), "unknown merge method"),
    (lambda m, t: merge("average", m[:2], components=["attn"]), "unknown component 'attn'"),
    (lambda m, t: merge("average", m[:2], out=t), "already exists"),
])
def test_bad_input_is_one_clear_error(call, message, sst2_models, tmp_path):
    (tmp_path / "x").write_text("keep me")
    with pytest.raises(MergeLabError, match=message):
        call(sst2_models, tmp_path)
    assert (tmp_path / "x").read_text() == "keep me"  # nothing overwritten


def test_mismatched_architectures_vocabularies_and_nan(pico, tmp_path):
    a = str(pico("sst2", 0))
    wide = make_pico(tmp_path / "wide", "sst2", 0, intermediate_size=96)
    with pytest.raises(MergeLabError, match="architectures"):
        merge("average", [a, str(wide)])
    small_vocab = make_pico(tmp_path / "vocab", "sst2", 0)
    config = json.loads((small_vocab / "config.json").read_text())
    state = load_file(small_vocab / "model.safetensors")
    state["bert.embeddings.word_embeddings.weight"] = state["bert.embeddings.word_embeddings.weight"][:1000].clone()
    save_file(state, small_vocab / "model.safetensors")
    (small_vocab / "config.json").write_text(json.dumps({**config, "vocab_size": 1000}))
    with pytest.raises(MergeLabError, match="vocabulary"):
        merge("average", [a, str(small_vocab)])
    broken = make_pico(tmp_path / "nan", "sst2", 1)
    state = load_file(broken / "model.safetensors")
    state["bert.encoder.layer.0.output.dense.weight"][0, 0] = float("nan")
    save_file(state, broken / "model.safetensors")
    with pytest.raises(MergeLabError, match=r"encoder.layer.0.output.dense.weight of model .*nan.* NaN"):
        merge("average", [a, str(broken)])


def test_cli_merge_and_errors(sst2_models, tmp_path, capsys):
    from merging_core.cli import main

    assert main(["merge", "--method", "ties", "--models", *sst2_models[:2], "--base", sst2_models[2],
                 "--set", "density=0.5", "scope=tensor", "--out", str(tmp_path / "m"), "--eval", "--limit", "8",
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["tasks"] == ["sst2"] and summary["scores"]["sst2"]["n"] == 8
    assert "merge_method: ties" in (tmp_path / "m" / "mergekit.yaml").read_text()
    assert main(["merge", "--method", "ties", "--models", *sst2_models[:2], "--set", "density=0.5",
                 "--out", str(tmp_path / "n")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "--base" in err and "\n" not in err


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gradients", ["per_example", "batch_mean"])
def test_fisher_matches_the_naive_dense_loop(pico, gradients, device, monkeypatch):
    """The sparse word-embedding path and the per-example loop give the textbook diagonal Fisher."""
    from merging_core import stats

    monkeypatch.setenv("MERGELAB_DEVICE", device)  # statistics run where the model is loaded
    ref, task = ml.resolve(str(pico("sst2", 0))), ml.get_task("sst2")
    options = {**stats.DEFAULTS, "examples": 6, "gradients": gradients}
    ours = stats.compute(ref, task, "fisher", options)
    model = ml.load(ref, task).model
    assert next(model.parameters()).device.type == device
    examples = stats._examples(task, ml.load(ref, task).tokenizer, 6, torch.device(device))
    size = 1 if gradients == "per_example" else stats.BATCH
    batches = [stats._collate(examples[i: i + size], task) for i in range(0, 6, size)]
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for batch in batches:
        model.zero_grad()
        (-model(**batch).loss).backward()  # the batch-mean log-likelihood with gold labels
        for n, p in model.named_parameters():
            expected[n] += p.grad ** 2
    for n, value in expected.items():
        got = ours[stats.canonical(n)]["fisher"]
        assert got.dtype == value.dtype  # as torch.allclose required: the float32 cast below loses nothing
        assert_close(got.cpu(), (value / len(batches)).cpu(), atol=1e-10, rtol=1e-4, msg=n)
