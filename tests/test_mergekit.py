"""MergeLab against mergekit 0.1.5: the methods it claims to share give the same tensors.

mergekit runs in-process (`MergeConfiguration` + `run_merge`) on the same pico BERT
sequence-classification folders. Names are compared in canonical form (`bert.` stripped). The base
for task arithmetic / TIES is another pico SST-2 model: mergekit refuses a base whose architecture
class differs from the inputs' (a bare `BertModel`), see `test_yaml_with_bare_encoder_base`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("mergekit")

import warnings  # noqa: E402

import torch  # noqa: E402
import yaml  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

with warnings.catch_warnings():  # mergekit's lazy_unpickle touches the deprecated numpy.core
    warnings.simplefilter("ignore", DeprecationWarning)
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

from merging_core.merge import merge  # noqa: E402

from .helpers import assert_close  # noqa: E402

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def models(pico) -> list[str]:
    return [str(pico("sst2", s)) for s in (0, 1, 2)]


@pytest.fixture(scope="module")
def base(pico) -> str:
    return str(pico("sst2", 3))


def run_mergekit(config: dict | str, out: Path) -> dict[str, torch.Tensor]:
    """Run mergekit on a config (dict or YAML text); its output in canonical names."""
    if isinstance(config, str):
        config = yaml.safe_load(config)
    run_merge(MergeConfiguration.model_validate(config), str(out),
              MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False))
    return load_file(out / "model.safetensors")


def canonical(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("bert."): v for k, v in state.items()}


def assert_same(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    ours, theirs = canonical(ours), canonical(theirs)
    assert set(ours) == set(theirs), (sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours)))
    assert len(ours) == 41  # 5 embeddings + 2 layers x 16 + pooler 2 + classifier 2
    assert_close(ours, theirs, atol=TOLERANCE, msg="MergeLab vs mergekit")  # |diff| <= TOLERANCE everywhere


def mk_models(models: list[str], **per_model) -> list[dict]:
    return [{"model": m, "parameters": {k: (v[i] if isinstance(v, list) else v) for k, v in per_model.items()}}
            for i, m in enumerate(models)]


@pytest.mark.parametrize("weights", [None, [0.6, 0.3, 0.1], [3.0, 1.0, 2.0]],
                         ids=["uniform", "weighted", "unnormalised"])
def test_average_is_linear(models, tmp_path, weights):
    ours = merge("average", models, params={"weights": weights} if weights else None).state
    theirs = run_mergekit({"merge_method": "linear", "models": mk_models(models, weight=weights or 1.0),
                           "dtype": "float32"}, tmp_path / "mk")
    assert_same(ours, theirs)


def test_task_arithmetic(models, base, tmp_path):
    ours = merge("task_arithmetic", models, base=base, params={"lambda": 0.7}).state
    theirs = run_mergekit({"merge_method": "task_arithmetic", "base_model": base,
                           "models": mk_models(models, weight=0.7), "dtype": "float32"}, tmp_path / "mk")
    assert_same(ours, theirs)


def test_ties_tensor_scope(models, base, tmp_path):
    ours = merge("ties", models, base=base, params={"density": 0.5, "scope": "tensor", "lambda": 1.0}).state
    theirs = run_mergekit({"merge_method": "ties", "base_model": base,
                           "models": mk_models(models, weight=1.0, density=0.5), "dtype": "float32"}, tmp_path / "mk")
    assert_same(ours, theirs)
    # not vacuous: trimming and sign election changed the result away from plain task arithmetic
    plain = merge("task_arithmetic", models, base=base, params={"lambda": 1.0}).state
    assert (ours["encoder.layer.0.attention.self.query.weight"] -
            plain["encoder.layer.0.attention.self.query.weight"]).abs().max() > 1e-3


@pytest.mark.parametrize("method, params, with_base", [
    ("average", None, False),
    ("average", {"weights": [0.6, 0.3, 0.1]}, False),
    ("task_arithmetic", {"lambda": 0.7}, True),
    ("ties", {"density": 0.5, "scope": "tensor"}, True),
], ids=["average", "average-weighted", "task_arithmetic", "ties-tensor"])
def test_written_yaml_reproduces_the_merge(models, base, tmp_path, method, params, with_base):
    out = tmp_path / "merged"
    merge(method, models, base=base if with_base else None, params=params, out=out)
    text = (out / "mergekit.yaml").read_text()
    theirs = run_mergekit(text, tmp_path / "mk")
    ours = load_file(out / "model.safetensors")
    assert set(ours) == set(theirs)  # same file naming (bert.* + classifier.*)
    assert_same(ours, theirs)


def test_ties_model_scope_writes_no_yaml(models, base, tmp_path):
    merge("ties", models, base=base, params={"density": 0.5, "scope": "model"}, out=tmp_path / "m")
    assert not (tmp_path / "m" / "mergekit.yaml").exists()


def test_yaml_with_bare_encoder_base(models, pico, tmp_path):
    """The common real case (zoo fine-tunes, base `minilm` = BertModel): any yaml written must run."""
    out = tmp_path / "merged"
    merge("ties", models, base=str(pico(None, 3)), params={"density": 0.5, "scope": "tensor"}, out=out)
    if (out / "mergekit.yaml").exists():
        theirs = canonical(run_mergekit((out / "mergekit.yaml").read_text(), tmp_path / "mk"))
        ours = canonical(load_file(out / "model.safetensors"))
        encoder = [n for n in ours if not n.startswith("classifier.")]
        assert_close({n: ours[n] for n in encoder}, {n: theirs[n] for n in encoder}, atol=TOLERANCE)


@pytest.fixture(scope="module")
def bf16_models(models, base, tmp_path_factory) -> tuple[list[str], str]:
    """Two models and the base stored in bfloat16: magnitudes collide, so trimming meets exact ties."""
    root = tmp_path_factory.mktemp("bf16")
    out = []
    for src in models[:2] + [base]:
        dst = root / Path(src).name
        shutil.copytree(src, dst)
        state = load_file(dst / "model.safetensors")
        save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, dst / "model.safetensors", {"format": "pt"})
        out.append(str(dst))
    return out[:2], out[2]


def test_ties_tensor_scope_bf16(bf16_models, tmp_path):
    models, base = bf16_models
    ours = merge("ties", models, base=base, params={"density": 0.5, "scope": "tensor"}).state
    theirs = run_mergekit({"merge_method": "ties", "base_model": base,
                           "models": mk_models(models, weight=1.0, density=0.5), "dtype": "float32"}, tmp_path / "mk")
    # MergeLab computes in float32 and writes model A's dtype; round mergekit's float32 result the same way
    assert_same(ours, {k: v.to(torch.bfloat16) for k, v in theirs.items()})
