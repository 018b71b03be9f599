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


# ----------------------------------------------------------------------------------------------------
# decoders: tiny random Llama / Mistral / Qwen2 / GPT-2 checkpoints (built as in tests/test_families.py),
# a base and two "fine-tunes" = base + small noise, merged by both tools tensor by tensor

DECODERS = ("llama", "mistral", "qwen2", "gpt2")
# MergeLab method + params, and the same merge in mergekit (method, per-model parameters, global parameters)
DECODER_CASES = {
    "average": ({}, "linear", {"weight": 1.0}, None),
    "task_arithmetic": ({"lambda": 0.7}, "task_arithmetic", {"weight": 0.7}, None),
    # scope tensor + the default zero-sign rule `auto` = `plus` at tensor scope, as the BERT test above
    "ties": ({"density": 0.5, "scope": "tensor", "lambda": 1.0}, "ties", {"weight": 1.0, "density": 0.5}, None),
    "slerp": ({"t": 0.3}, "slerp", {}, {"t": 0.3}),
}
# bf16: both tools compute in float32 and round the result to bfloat16 once (MergeLab writes model A's
# dtype; mergekit gets `out_dtype: bfloat16`), and slerp's MergeLab arithmetic is float64 against mergekit's
# float32, so a float32 difference of ~1e-7 may round to neighbouring bf16 values: one bf16 ulp, i.e.
# |diff| <= 2^-7 * |value| (bf16 keeps 8 significant bits) plus a tiny absolute floor for values near 0.
BF16_RTOL, BF16_ATOL = 2.0 ** -7, 1e-6


@pytest.fixture(scope="module")
def decoder_folders(tmp_path_factory):
    """(family, dtype) -> ([fine-tune A, fine-tune B], base), saved with `save_pretrained`."""
    from .test_families import build, tiny_tokenizer

    root = tmp_path_factory.mktemp("decoders")
    made: dict[tuple[str, str], tuple[list[str], str]] = {}

    def get(family: str, dtype: str) -> tuple[list[str], str]:
        if (family, dtype) not in made:
            folders = []
            for seed in (0, 1, None):  # None: the base itself
                model = build(family, seed=0)
                if seed is not None:
                    generator = torch.Generator().manual_seed(2000 + seed)
                    with torch.no_grad():
                        for p in model.parameters():
                            p.add_(0.01 * torch.randn(p.shape, generator=generator))
                out = root / f"{family}-{dtype}-{'base' if seed is None else seed}"
                model.to(getattr(torch, dtype)).save_pretrained(out)
                tiny_tokenizer().save_pretrained(out)
                folders.append(str(out))
            made[family, dtype] = (folders[:2], folders[2])
        return made[family, dtype]

    return get


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", sorted(DECODER_CASES))
@pytest.mark.parametrize("family", DECODERS)
def test_decoders_match_mergekit(family, method, dtype, decoder_folders, tmp_path):
    from .test_families import adapter_of

    models, base = decoder_folders(family, dtype)
    params, mk_method, per_model, global_params = DECODER_CASES[method]
    needs_base = method in ("task_arithmetic", "ties")
    ours = merge(method, models, base=base if needs_base else None, params=params or None).state
    config = {"merge_method": mk_method, "models": mk_models(models, **per_model), "dtype": "float32"}
    if needs_base:
        config["base_model"] = base
    if method == "slerp":  # mergekit's slerp interpolates from its base_model (t=0) to the other model
        config["base_model"] = models[0]
    if global_params:
        config["parameters"] = global_params
    if dtype == "bfloat16":
        config["out_dtype"] = "bfloat16"
    theirs = run_mergekit(config, tmp_path / "mk")
    adapter = adapter_of(models[0])
    theirs = {adapter.canonical(k): v for k, v in theirs.items()}
    ours = {adapter.canonical(k): v for k, v in ours.items()}
    # every tensor mergekit writes is compared; MergeLab writes nothing more (a tied lm_head is in neither)
    assert set(theirs) == set(ours), (sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours)))
    assert len(theirs) >= 2 + 2 * 9
    # untied decoders' lm_head is compared too; GPT-2's output layer is tied to wte, so neither writes it
    assert ("lm_head.weight" in theirs) == (family != "gpt2")
    if dtype == "float32":
        assert all(v.dtype == torch.float32 for v in ours.values())
        assert_close(ours, theirs, atol=TOLERANCE, msg=f"{family} {method} MergeLab vs mergekit")
    else:
        assert all(v.dtype == torch.bfloat16 for v in list(ours.values()) + list(theirs.values()))
        assert_close(ours, theirs, atol=BF16_ATOL, rtol=BF16_RTOL, msg=f"{family} {method} bf16")
    if method == "ties" and dtype == "float32":  # not vacuous: TIES is not plain task arithmetic here
        plain = merge("task_arithmetic", models, base=base, params={"lambda": 1.0}).state
        assert max(float((ours[k] - plain[k]).abs().max()) for k in ours) > 1e-4
