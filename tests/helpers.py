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
