"""The conventions of the reference codes, each an option, each checked against an independent computation:
RegMean's model weighting, Fisher's normalisation, TIES's zero-sign rule and trim count, MaTS's Jacobi
preconditioner and closed form, SLERP of a zero tensor (mergekit's rule), and the notes in mergekit.yaml."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import merging_core as ml
from merging_core import stats as stats_io
from merging_core.errors import MergeLabError
from merging_core.merge import merge, merge_from_config
from merging_core.methods import TensorJob, WholeModel, get_method
from merging_core.methods.ties_dare import trim_tensor_
from merging_core.spec import MergeSpec

from .golden.pico_merges import synthetic_stats
from .helpers import assert_close


def _job(tensors, stats=None, base=None, weights=None, context=None, **params):
    spec = get_method(params.pop("method"))
    n = len(tensors)
    weights = torch.full((n,), 1 / n) if weights is None else torch.tensor(weights)
    job = TensorJob("w", ml.arch.ParamInfo("w", "attention", "query", 0), tensors, weights, spec.parse(params),
                    base=base, stats=stats, context=context or {})
    return spec, job


def _spd(d: int, seed: int, scales: torch.Tensor | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * d, d, generator=g, dtype=torch.float64)
    if scales is not None:
        x = x * scales  # features of very different scales: an ill-conditioned Gram
    return x.T @ x / (4 * d)


# ---------------------------------------------------------------------------------------------------
# RegMean: models (the papers' code) or tokens


def test_regmean_weighting_models_ignores_token_counts_and_tokens_uses_them():
    ws = [torch.randn(5, 4, dtype=torch.float64) for _ in range(2)]
    gram = _spd(4, 0)
    stats = [{"gram": gram, "gram_count": torch.tensor(10.0)}, {"gram": gram, "gram_count": torch.tensor(30.0)}]
    spec, job = _job(ws, stats, method="regmean", alpha=0.7)
    assert job.params["weighting"] == "models"  # the default
    assert_close(spec.merge_tensor(job), (ws[0] + ws[1]) / 2, atol=1e-10)  # identical Grams: the plain average
    spec, job = _job(ws, stats, method="regmean", alpha=0.7, weighting="tokens")
    assert_close(spec.merge_tensor(job), (10 * ws[0] + 30 * ws[1]) / 40, atol=1e-10)


def test_regmean_weighting_models_is_the_closed_form_with_mean_grams():
    ws = [torch.randn(6, 4, dtype=torch.float64) for _ in range(3)]
    grams = [_spd(4, i) for i in range(3)]
    counts = [5.0, 50.0, 500.0]
    c = [0.5, 0.3, 0.2]
    stats = [{"gram": g, "gram_count": torch.tensor(n)} for g, n in zip(grams, counts)]
    spec, job = _job(ws, stats, weights=c, method="regmean", alpha=1.0)
    lhs = sum(ci * g for ci, g in zip(c, grams))
    expected = torch.linalg.solve(lhs, sum(ci * g @ w.T for ci, g, w in zip(c, grams, ws))).T
    assert_close(spec.merge_tensor(job), expected, atol=1e-6)  # the model weights c are float32


def test_regmean_tokens_without_a_token_count_is_a_clear_error():
    ws = [torch.randn(5, 4, dtype=torch.float64) for _ in range(2)]
    spec, job = _job(ws, [{"gram": _spd(4, 0)}, {"gram": _spd(4, 1)}], method="regmean", weighting="tokens")
    with pytest.raises(MergeLabError, match=r"record no token count.*weighting=models") as error:
        spec.merge_tensor(job)
    assert error.value.param == "weighting" and "\n" not in str(error.value)
    _, job = _job(ws, [{"gram": _spd(4, 0)}, {"gram": _spd(4, 1)}], method="regmean")
    assert torch.isfinite(spec.merge_tensor(job)).all()  # the default needs no count


@pytest.mark.parametrize("objective", ["regmean", "kfac"])
def test_mats_objectives_follow_the_same_weighting(objective):
    ws = [torch.randn(6, 4, dtype=torch.float64) for _ in range(2)]
    stats = [{"gram": _spd(4, i), "gram_count": torch.tensor(10.0 ** (i + 1)), "grad_gram": _spd(6, 5 + i),
              "grad_gram_count": torch.tensor(10.0)} for i in range(2)]
    for weighting in ("models", "tokens"):
        spec, job = _job(ws, stats, method="mats", objective=objective, weighting=weighting, init="average",
                         iterations=2000, tolerance=1e-13)
        merged = spec.merge_tensor(job).double()
        scale = [1.0, 1.0] if weighting == "models" else [10.0, 100.0]
        grams = [s * st["gram"] * 0.5 for s, st in zip(scale, stats)]
        outs = [0.9 * st["grad_gram"] + 0.1 * torch.diag_embed(st["grad_gram"].diagonal()) for st in stats]
        grams = [0.9 * g + 0.1 * torch.diag_embed(g.diagonal()) for g in grams]
        if objective == "regmean":
            gradient = sum(g @ (merged.T - w.T) for g, w in zip(grams, ws))
        else:
            gradient = sum(g @ (merged.T - w.T) @ o for g, w, o in zip(grams, ws, outs))
        assert gradient.abs().max() < 1e-8, weighting


def test_statistics_without_task_or_token_count_still_merge(pico, tmp_path):
    """A statistics file someone else wrote may record neither the task nor a token count."""
    models = [str(pico("sst2", 0)), str(pico("sst2", 1))]
    files = []
    for seed, model in enumerate(models):
        path = synthetic_stats(model, ["gram"], tmp_path, seed)
        values, record = stats_io.load_stats(path)
        record.pop("task")
        values = {name: {k: v for k, v in kinds.items() if not k.endswith("_count")} for name, kinds in values.items()}
        stats_io.save_stats(values, record, path)
        files.append(str(path))
    result = merge("regmean", models, stats_files=files, out=tmp_path / "m")
    config = json.loads((result.out / "merge_config.json").read_text())
    assert config["stats"][0]["kind"] == "gram" and "task" not in config["stats"][0]
    again = merge_from_config(result.out / "merge_config.json", tmp_path / "again")
    for name in ("model.safetensors",):
        assert (again.out / name).read_bytes() == (result.out / name).read_bytes()
    with pytest.raises(MergeLabError, match="no token count"):
        merge("regmean", models, params={"weighting": "tokens"}, stats_files=files, out=tmp_path / "t")


# ---------------------------------------------------------------------------------------------------
# Fisher: none, per parameter, whole model


def test_fisher_whole_model_normalisation_divides_by_each_models_fisher_norm():
    w1 = [torch.randn(3, 2) for _ in range(2)]  # parameter 1 (merged below), two models
    f1 = [torch.rand(3, 2) + 0.1, 100 * (torch.rand(3, 2) + 0.1)]
    f2 = [torch.rand(4) + 0.1, 100 * (torch.rand(4) + 0.1)]  # parameter 2: counts in the norms only
    stats = [{"p1": {"fisher": f1[i]}, "p2": {"fisher": f2[i]}} for i in range(2)]
    params = get_method("fisher").parse({"normalize": "model"})
    context = get_method("fisher").prepare(WholeModel(["p1", "p2"], lambda: iter(()), stats), params)
    norms = [float(torch.cat([f1[i].flatten(), f2[i].flatten()]).norm()) for i in range(2)]
    assert context["fisher_norms"] == pytest.approx(norms, rel=1e-6)
    spec, job = _job(w1, [{"fisher": f} for f in f1], context=context, method="fisher", normalize="model")
    c = torch.tensor([1 / norms[0], 1 / norms[1]])
    expected = sum(ci * f * w for ci, f, w in zip(c, f1, w1)) / sum(ci * f for ci, f in zip(c, f1))
    assert_close(spec.merge_tensor(job), expected, atol=1e-6, rtol=1e-5)
    # without normalisation the large Fisher dominates; with it both models count
    _, plain = _job(w1, [{"fisher": f} for f in f1], method="fisher")
    assert (spec.merge_tensor(plain) - w1[1]).abs().max() < (spec.merge_tensor(job) - w1[1]).abs().max()


def test_fisher_normalize_reads_saved_booleans():
    spec = get_method("fisher")
    assert spec.parse({"normalize": True})["normalize"] == "parameter"
    assert spec.parse({"normalize": "false"})["normalize"] == "none"
    with pytest.raises(MergeLabError, match=r"one of \['none', 'model', 'parameter'\]"):
        spec.parse({"normalize": "layer"})


def test_fisher_model_normalisation_in_a_real_merge(pico, tmp_path):
    models = [str(pico("sst2", 0)), str(pico("cola", 1))]
    files = [str(synthetic_stats(m, ["fisher"], tmp_path, seed)) for seed, m in enumerate(models)]
    merged = {mode: merge("fisher", models, params={"normalize": mode}, stats_files=files).state
              for mode in ("none", "model", "parameter")}
    key = "encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(merged["none"][key], merged["model"][key])
    assert not torch.equal(merged["model"][key], merged["parameter"][key])
    assert all(torch.isfinite(t).all() for state in merged.values() for t in state.values())


# ---------------------------------------------------------------------------------------------------
# TIES: the zero-sign rule and the trim count


def _ties(tensors, base, context=None, **params):
    spec, job = _job(tensors, base=base, method="ties", **params)
    if context is None:
        context = spec.prepare(WholeModel(["w"], lambda: iter([("w", job.info, tensors, base)])), job.params)
    job.context = context
    return spec.merge_tensor(job)


def test_ties_zero_sign_rules():
    base = torch.zeros(5)
    # entry 0 cancels exactly (+2, −2); the others make the grand total negative while most elected
    # signs are positive, so the rules disagree there
    t1 = torch.tensor([2.0, 1.0, 1.0, 1.0, -9.0])
    t2 = torch.tensor([-2.0, 0.5, 0.5, 0.5, 0.0])
    total = float((t1 + t2).sum())
    assert total < 0 and int(((t1 + t2)[1:] > 0).sum()) == 3  # grand total −, majority of signs +
    common = {"density": 1.0, "scope": "model", "lambda": 1.0}
    # total (the paper): the cancelled entry takes −, so only model 2's −2 survives
    assert float(_ties([t1, t2], base, zero_sign="total", **common)[0]) == -2.0
    assert float(_ties([t1, t2], base, zero_sign="auto", **common)[0]) == -2.0  # auto = total for scope model
    # majority (the authors' code): +, so model 1's +2
    assert float(_ties([t1, t2], base, zero_sign="majority", **common)[0]) == 2.0
    assert float(_ties([t1, t2], base, zero_sign="plus", **common)[0]) == 2.0
    # scope tensor: auto = plus (mergekit); total is computed over the tensor
    assert float(_ties([t1, t2], base, zero_sign="auto", density=1.0, scope="tensor")[0]) == 2.0
    assert float(_ties([t1, t2], base, zero_sign="total", density=1.0, scope="tensor")[0]) == -2.0


def test_ties_model_scope_computes_the_zero_sign_at_density_one():
    base = torch.zeros(3)
    t1, t2 = torch.tensor([1.0, -5.0, 0.0]), torch.tensor([-1.0, 0.0, 0.0])
    spec, job = _job([t1, t2], base=base, method="ties", density=1.0, scope="model")
    context = spec.prepare(WholeModel(["w"], lambda: iter([("w", job.info, [t1, t2], base)])), job.params)
    assert context["zero_sign"] == -1.0  # the grand total is −5
    assert float(_ties([t1, t2], base, density=1.0, scope="model")[0]) == -1.0


def test_ties_trim_keeps_exactly_k_entries():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(1000, generator=g)
    for density in (0.001, 0.2, 0.5, 0.999):
        kept = trim_tensor_(delta.clone(), density)
        k = max(1, int(density * delta.numel()))
        assert int(torch.count_nonzero(kept)) == k
        assert float(kept[kept != 0].abs().min()) == float(delta.abs().sort(descending=True).values[k - 1])


# ---------------------------------------------------------------------------------------------------
# MaTS: Jacobi preconditioner, closed form


def test_mats_jacobi_solves_diagonal_fisher_in_one_step():
    ws = [torch.randn(6, 4) for _ in range(2)]
    stats = [{"fisher": (torch.rand(6, 4) + 0.01) * 10.0 ** (3 * i)} for i in range(2)]
    spec, job = _job(ws, stats, method="mats", objective="diagonal_fisher", init="average", tolerance=1e-12)
    merged = spec.merge_tensor(job)
    f = torch.stack([s["fisher"] for s in stats])
    assert_close(merged, (f * torch.stack(ws)).sum(0) / f.sum(0), atol=1e-5, rtol=1e-5)
    assert job.report["steps"] <= 1 and job.report["converged"]


def test_mats_jacobi_converges_where_plain_cg_does_not():
    """Input features whose scales span 1e3 (a Gram with condition number ~1e6, as on a feed-forward output)."""
    d_in, d_out = 48, 8
    scales = torch.logspace(0, 3, d_in, dtype=torch.float64)
    ws = [torch.randn(d_out, d_in, dtype=torch.float64) / scales for _ in range(2)]
    stats = [{"gram": _spd(d_in, 20 + i, scales)} for i in range(2)]
    assert torch.linalg.cond(stats[0]["gram"]) > 1e5
    exact = get_method("regmean").merge_tensor(_job(ws, stats, method="regmean")[1])
    error = {}
    for preconditioner in ("none", "jacobi"):
        spec, job = _job(ws, stats, method="mats", objective="regmean", init="average", iterations=30,
                         preconditioner=preconditioner, tolerance=1e-12)
        error[preconditioner] = float((spec.merge_tensor(job) - exact).norm() / exact.norm())
    assert error["jacobi"] < 1e-6 < error["none"]


def test_mats_closed_form_equals_regmean_and_is_refused_for_kfac(pico):
    ws = [torch.randn(6, 4, dtype=torch.float64) for _ in range(3)]
    stats = [{"gram": _spd(4, i)} for i in range(3)]
    spec, job = _job(ws, stats, method="mats", objective="regmean", solver="closed_form")
    merged = spec.merge_tensor(job)
    assert_close(merged, get_method("regmean").merge_tensor(_job(ws, stats, method="regmean")[1]), atol=1e-12)
    assert job.report["solver"] == "closed_form" and job.report["residual_after"] < 1e-10
    models = (str(pico("sst2", 0)), str(pico("sst2", 1)))
    with pytest.raises(MergeLabError, match=r"kfac objective has no closed form; use solver=cg") as error:
        MergeSpec("mats", models, params={"objective": "kfac", "solver": "closed_form"})
    assert error.value.param == "solver"


# ---------------------------------------------------------------------------------------------------
# SLERP of a zero tensor, and the notes in mergekit.yaml


@pytest.mark.parametrize("t", [0.25, 0.5, 0.8])
@pytest.mark.parametrize("zero", ["a", "b"])
def test_slerp_of_a_zero_tensor_follows_mergekit(t, zero):
    mergekit_slerp = pytest.importorskip("mergekit.merge_methods.slerp").slerp
    x = torch.randn(8, 5)
    a, b = (torch.zeros_like(x), x) if zero == "a" else (x, torch.zeros_like(x))
    spec, job = _job([a, b], method="slerp", t=t)
    ours = spec.merge_tensor(job)
    theirs = mergekit_slerp(torch.tensor([t]), a.unsqueeze(0), b.unsqueeze(0)).squeeze(0)
    assert_close(ours, theirs, atol=1e-6)
    expected = (torch.sin(torch.tensor(t * torch.pi / 2)) * x if zero == "a"
                else torch.sin(torch.tensor((1 - t) * torch.pi / 2)) * x)
    assert_close(ours, expected, atol=1e-6)  # orthogonal: Ω = π/2, not linear interpolation


def test_mergekit_yaml_notes_say_what_mergekit_does(pico, tmp_path):
    models = [str(pico("sst2", 0)), str(pico("sst2", 1))]
    slerp = merge("slerp", models, out=tmp_path / "s").out / "mergekit.yaml"
    assert "row" not in slerp.read_text()
    dare = merge("dare", models, base=str(pico("sst2", 5)), out=tmp_path / "d").out / "mergekit.yaml"
    assert "L1 norm" in dare.read_text()


def test_merge_tab_lists_convergence_per_parameter_worst_first():
    from views.merge_tab import residual_summary

    report = {f"encoder.layer.{i}.output.dense.weight": {"residual_before": 1.0, "residual_after": 10.0 ** -(i + 3),
                                                          "steps": 100, "converged": i >= 3} for i in range(5)}
    report["pooler.dense.weight"] = {"singular_gram": True}  # not a solve: not listed
    text = residual_summary(report)
    assert text.startswith("Conjugate gradient on 5 parameters, 2 reached the tolerance")
    table = text.split("<details>")[1]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert [r.split("`")[1] for r in rows] == [f"encoder.layer.{i}.output.dense.weight" for i in range(5)]
    assert rows[0].endswith("| no |") and rows[-1].endswith("| yes |")
    closed = residual_summary({"w": {"solver": "closed_form", "residual_after": 1e-12, "steps": 0}})
    assert closed.startswith("Closed form on 1 parameter: median relative residual 1.00e-12")


def test_a_parameter_only_some_models_have_is_merged_whatever_the_order(pico, tmp_path):
    """A token classifier has no pooler; a sequence classifier has one. Either may come first."""
    ner, sst2 = str(pico("conll2003", 0)), str(pico("sst2", 1))
    pooler = {k: v for k, v in load_file(Path(sst2) / "model.safetensors").items() if "pooler" in k}
    assert pooler and not any("pooler" in k for k in load_file(Path(ner) / "model.safetensors"))
    for order in ([ner, sst2], [sst2, ner]):
        result = merge("average", order, out=tmp_path / Path(order[0]).name)
        assert sorted(result.tasks) == ["conll2003", "sst2"]
        merged = load_file(result.out / "model.safetensors")
        for name, tensor in pooler.items():  # held by one model: that model's tensor
            assert torch.equal(merged[name.removeprefix("bert.")] if name.removeprefix("bert.") in merged
                               else merged[name], tensor)
