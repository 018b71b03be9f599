"""Every method's merged tensors, bit for bit, against digests written by the engine before its merge
request object (`MergeSpec`) and checkpoint layer existed (see tests/golden/pico_merges.py)."""

from __future__ import annotations

import json

import pytest

from merging_core import merge

from .golden.pico_merges import CASES, GOLDEN, make_models, run_case


@pytest.fixture(scope="module")
def golden_models(tmp_path_factory):
    return make_models(tmp_path_factory.mktemp("golden-models"))


@pytest.mark.parametrize("case", sorted(CASES))
def test_merged_tensors_are_bit_identical(case, golden_models, tmp_path):
    expected = json.loads(GOLDEN.read_text())[case]
    got = run_case(case, golden_models, tmp_path, merge)
    assert sorted(got) == sorted(expected)  # the same files and tensors
    changed = [name for name in expected if got[name] != expected[name]]
    assert not changed, f"{len(changed)} tensors differ, e.g. {changed[:3]}"
