"""Bottleneck adapters (Houlsby et al. 2019, arXiv:1902.00751, Sec. 2.1): the module computes the base
function when its up-projection is zero, sits where the paper puts it (after each sub-layer's output
projection, before the skip connection and layer norm), survives a save/load round trip bit for bit,
trains only its own tensors, and moves in module space on a curve."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from safetensors import safe_open

import merging_core as ml
from merging_core import bottleneck, models
from merging_core.tasks import get_task

LIMIT = 16


def _batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (3, 9), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _classifier(pico):
    return models.load(str(pico("sst2")), get_task("sst2"), device="cpu").model


def test_fresh_bottleneck_computes_the_base_function_and_sits_after_each_output_projection(pico):
    base = _classifier(pico)
    torch.manual_seed(1)
    adapted = bottleneck.insert(copy.deepcopy(base), bottleneck.BottleneckConfig(size=5))
    with torch.no_grad():
        assert torch.equal(adapted(**_batch()).logits, base(**_batch()).logits)  # up = 0: exactly the base
    sites = [m for n, m in adapted.named_modules() if hasattr(m, "bottleneck")]
    assert len(sites) == 2 * adapted.config.num_hidden_layers  # attention output and feed-forward output
    site = sites[0]
    assert site.bottleneck.down.weight.abs().max() > 0  # the identity comes from up = 0 alone
    assert site.bottleneck.down.weight.abs().max() <= 2 * bottleneck.INIT_STD  # truncated at two std
    with torch.no_grad():
        site.bottleneck.up.weight.normal_(0, 0.5)
        site.bottleneck.up.bias.normal_(0, 0.5)
        hidden, residual = torch.randn(2, 4, 32), torch.randn(2, 4, 32)
        y = site.dense(hidden)  # the hook runs the adapter: the sub-layer computed by hand, without the hook
        raw = torch.nn.functional.linear(hidden, site.dense.weight, site.dense.bias)
        by_hand = raw + site.bottleneck.up(torch.nn.functional.gelu(site.bottleneck.down(raw)))
        assert torch.allclose(y, by_hand, atol=1e-6)
        assert torch.allclose(site(hidden, residual), site.LayerNorm(by_hand + residual), atol=1e-6)
        assert not torch.allclose(adapted(**_batch()).logits, base(**_batch()).logits)
    tuned = bottleneck.tuned_names(adapted)
    assert {n for n, p in adapted.named_parameters() if p.requires_grad} == set(tuned)
    assert all(".bottleneck." in n or ".LayerNorm." in n or n.startswith("classifier.") for n in tuned)
    assert not any("embeddings" in n or "pooler" in n or ".dense.weight" in n and ".bottleneck." not in n
                   for n in tuned)


def test_bottleneck_module_trains_saves_only_its_tensors_and_loads_identically(pico, tmp_path):
    config = ml.TrainConfig(task="sst2", base=str(pico(None)), steps=3, batch_size=4, peft="bottleneck",
                            bottleneck_size=4, eval_limit=LIMIT, lr=1e-2)
    result = ml.train(config, tmp_path / "bn")
    folder = tmp_path / "bn"
    assert result.metadata["kind"] == "bottleneck"
    assert not (folder / "model.safetensors").exists()
    settings = json.loads((folder / "adapter_config.json").read_text())
    assert settings["peft_type"] == "BOTTLENECK" and settings["bottleneck_size"] == 4
    ref = models.resolve(str(folder))
    assert ref.is_adapter and models.adapter_kind(ref) == "bottleneck"
    live = models.load_adapter(ref)
    with safe_open(folder / models.ADAPTER_FILE, "pt") as f:
        keys = set(f.keys())
        assert keys == {bottleneck.FILE_PREFIX + n for n in bottleneck.tuned_names(live)}
        # training moved the adapters (up no longer zero) and the head
        ups = [f.get_tensor(k) for k in keys if k.endswith("bottleneck.up.weight")]
        assert ups and all(u.abs().max() > 0 for u in ups)
    base = models.load(str(pico(None)), get_task("sst2"), new_head=True, device="cpu").model
    frozen = dict(base.named_parameters())
    for name, param in live.named_parameters():  # everything outside the module is the base's, untouched
        if name not in bottleneck.tuned_names(live) and name in frozen and "classifier" not in name:
            assert torch.equal(param, frozen[name]), name
    # round trip: save the live module again, load it, same logits bit for bit; scores as recorded
    again = models.save(live, models.load_tokenizer(ref), tmp_path / "bn-again", ref.metadata())
    reloaded = models.load(str(again), get_task("sst2"), device="cpu").model
    with torch.no_grad():
        assert torch.equal(reloaded(**_batch(3)).logits, live(**_batch(3)).logits)
    scored = ml.evaluate(str(folder), "sst2", limit=LIMIT)
    assert scored["accuracy"] == pytest.approx(result.metadata["scores"]["dev"]["accuracy"])
    assert scored["loss"] == pytest.approx(result.metadata["scores"]["dev"]["loss"], rel=1e-5)


def test_module_space_curve_between_a_bottleneck_module_and_itself_is_flat(pico, tmp_path):
    config = ml.TrainConfig(task="sst2", base=str(pico(None)), steps=2, batch_size=4, peft="bottleneck",
                            bottleneck_size=4, eval_limit=LIMIT, lr=1e-2)
    module = str(ml.train(config, tmp_path / "bn").out)
    twin = str(shutil.copytree(module, tmp_path / "bn-twin"))
    run = ml.curve(module, twin, "sst2", points=3, limit=LIMIT)
    points = [item for item in run if item["kind"] == "point"]
    assert run.space == "module"
    assert run.names and all(".bottleneck." in n or ".LayerNorm." in n or n.startswith("classifier.")
                             for n in run.names)
    own = ml.evaluate(module, "sst2", limit=LIMIT)
    for point in points:
        assert point["scores"]["sst2"]["accuracy"] == own["accuracy"]
        assert point["scores"]["sst2"]["loss"] == pytest.approx(own["loss"], abs=1e-6)
    summary = run.summary()
    assert summary["distances"]["l2"] == 0
    assert summary["barriers"]["sst2"]["loss_barrier"] == pytest.approx(0, abs=1e-6)
    with pytest.raises(ml.MergeLabError, match="space .module. needs adapter modules"):
        ml.curve(module, str(pico("sst2", 0)), "sst2", space="module")
