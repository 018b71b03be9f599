"""Shared test helpers: one tolerance check, and the devices the invariant tests run on."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch

# The invariant tests of merges, curves and statistics run on every device; "cuda" is marked `gpu`,
# so `conftest.py` skips it (with its reason) where CUDA is not available.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def assert_close(actual, expected, *, atol: float, rtol: float = 0.0, msg: str = "") -> None:
    """|actual - expected| <= atol + rtol * |expected| elementwise, both cast to float32, same shapes.

    `actual` and `expected` are two tensors, or two dicts of tensors (state dicts): then the key sets
    must be equal and every tensor is compared, a failure naming the key and the max abs difference.
    Note `torch.allclose`'s default rtol is 1e-5: its equivalent is `assert_close(a, b, atol=x, rtol=1e-5)`;
    `atol=0, rtol=0` is exact equality of the float32 values.
    """
    prefix = f"{msg}: " if msg else ""
    if isinstance(actual, Mapping) or isinstance(expected, Mapping):
        assert isinstance(actual, Mapping) and isinstance(expected, Mapping), (
            f"{prefix}comparing a {type(actual).__name__} with a {type(expected).__name__}")
        only_actual, only_expected = sorted(set(actual) - set(expected)), sorted(set(expected) - set(actual))
        assert not only_actual and not only_expected, (
            f"{prefix}key sets differ: only in actual {only_actual}, only in expected {only_expected}")
        for key in expected:
            _compare(actual[key], expected[key], atol, rtol, f"{prefix}{key}")
        return
    _compare(actual, expected, atol, rtol, msg)


def _compare(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, where: str) -> None:
    actual, expected = actual.float(), expected.float()
    try:
        torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)
    except AssertionError as error:
        if actual.shape == expected.shape and actual.device == expected.device and actual.numel():
            diff = f"max |actual - expected| = {(actual - expected).abs().max().item():.3g}"
        else:
            diff = f"shapes {tuple(actual.shape)} vs {tuple(expected.shape)} on {actual.device} vs {expected.device}"
        raise AssertionError(f"{where + ': ' if where else ''}{diff} (atol={atol}, rtol={rtol})\n{error}") from None


def randomised(model: torch.nn.Module, seed: int = 7) -> torch.nn.Module:
    """A copy whose every weight, bias and LayerNorm parameter is random (a fresh BERT's constant biases and
    LayerNorms would hide a permutation, a merge or an unmerge that forgot them)."""
    import copy

    model = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model


def token_batch() -> dict[str, torch.Tensor]:
    """Three fixed rows of 12 token ids, the first padded after 8 tokens."""
    ids = torch.randint(1000, 5000, (3, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0  # padding too
    return {"input_ids": ids, "attention_mask": mask}
