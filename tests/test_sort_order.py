"""The set torch's argsort puts first, without the sort: equal to the sort on arrays full of ties, and the
sort itself wherever the shortcut does not apply."""

import pytest
import torch

from merging_core.methods import sort_order
from merging_core.methods.sort_order import sorted_top
from merging_core.methods.ties_dare import trim_tensor_


def argsort_top(values: torch.Tensor, k: int) -> torch.Tensor:
    keep = torch.zeros(values.numel(), dtype=torch.bool)
    keep[torch.argsort(values, descending=True)[:k]] = True
    return keep


def test_the_shortcut_applies_to_this_torch():
    assert sort_order._emulates_torch_sort()


@pytest.mark.parametrize("seed", range(6))
def test_equals_argsort_on_arrays_full_of_ties(seed):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(40):
        n = int(torch.randint(2, 3000, (1,), generator=generator))
        distinct = int(torch.randint(1, 30, (1,), generator=generator))
        values = torch.randint(0, distinct, (n,), generator=generator).float()
        k = int(torch.randint(0, n + 1, (1,), generator=generator))
        assert torch.equal(sorted_top(values.clone(), k), argsort_top(values, k)), (n, distinct, k)


@pytest.mark.parametrize("n", [300_001, 2_000_000])
def test_equals_argsort_on_bf16_magnitudes(n):
    """The case TIES meets: |τ| of a bf16 task vector as float32, a density of 0.2, thousands of ties."""
    values = (torch.randn(n, generator=torch.Generator().manual_seed(n)) * 1e-2).bfloat16().abs().float()
    k = max(1, int(0.2 * n))
    keep = argsort_top(values, k)
    threshold = values[keep].min()
    assert int((values == threshold).sum()) > int((values[keep] == threshold).sum())  # the sort broke ties
    assert torch.equal(sorted_top(values.clone(), k), keep)


def test_the_introselect_runs_instead_of_the_sort(monkeypatch):
    values = torch.randint(0, 5, (50_000,), generator=torch.Generator().manual_seed(1)).float()
    expected = argsort_top(values, 20_000)
    sorts = []
    real = torch.argsort
    monkeypatch.setattr(torch, "argsort", lambda *a, **kw: sorts.append(kw) or real(*a, **kw))
    assert torch.equal(sorted_top(values.clone(), 20_000), expected)
    assert all(kw.get("stable") for kw in sorts)  # only the final ≤16-entry segment's stable sort


def test_falls_back_to_the_sort_where_the_shortcut_does_not_hold(monkeypatch):
    values = torch.randint(0, 3, (5000,), generator=torch.Generator().manual_seed(2)).float()
    values[7] = float("nan")  # argsort puts NaN first; the partitions do not model it
    assert torch.equal(sorted_top(values.clone(), 100), argsort_top(values, 100))
    monkeypatch.setattr(sort_order, "_emulates_torch_sort", lambda: False)
    values = values.nan_to_num()
    assert torch.equal(sorted_top(values.clone(), 100), argsort_top(values, 100))


def test_trim_keeps_exactly_k_as_mergekit_does():
    delta = (torch.randn(400, 300, generator=torch.Generator().manual_seed(3)) * 1e-2).bfloat16().float()
    magnitude = delta.abs().flatten()
    k = int(0.3 * delta.numel())
    expected = delta * argsort_top(magnitude, k).view_as(delta)
    assert torch.equal(trim_tensor_(delta.clone(), 0.3, "sort"), expected)


@pytest.mark.parametrize("estimate", ["start", "end"])
def test_a_wrong_estimate_of_the_crossing_costs_time_not_the_result(monkeypatch, estimate):
    values = (torch.randn(400_000, generator=torch.Generator().manual_seed(4)) * 1e-2).bfloat16().abs().float()
    expected = argsort_top(values, 80_000)
    windows = []
    real = sort_order._crossing
    monkeypatch.setattr(sort_order, "_crossing", lambda *a: windows.append(a[2:]) or real(*a))
    monkeypatch.setattr(sort_order, "_estimated_crossing", lambda v, p: 0 if estimate == "start" else v.numel())
    assert torch.equal(sorted_top(values.clone(), 80_000), expected)
    assert windows[0] != (400_000, 0) and windows[1] == (400_000, 0)  # the windows missed: the whole segment
