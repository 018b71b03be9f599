"""Data maps (Swayamdipta et al. 2020): recorded during pico fine-tuning, checked against own forward passes
at the saved checkpoints; relating them to forgetting along a path, checked by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import merging_core as ml
from merging_core import cartography, data
from merging_core.curves import CurveSpec, curve
from merging_core.training import TrainConfig, train

EXAMPLES = 12


@pytest.fixture(scope="module")
def mapped(pico, tmp_path_factory):
    """A pico SST-2 fine-tune that records a data map every 2 of its 6 steps, saving a checkpoint at each."""
    out = tmp_path_factory.mktemp("cartography") / "run"
    config = TrainConfig(task="sst2", base=str(pico(None)), steps=6, batch_size=4, lr=1e-2, eval_limit=8,
                         save_every=2, cartography=EXAMPLES, cartography_every=2)
    return train(config, out)


def _gold_probs(model: str, indices: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """p(gold) and argmax == gold of the train examples `indices`, by the model's own padded forward pass."""
    loaded = ml.load(model, ml.get_task("sst2"))
    raw = data.load_split(ml.get_task("sst2"), "train")
    inputs = loaded.tokenizer([raw.texts[i][0] for i in indices], truncation=True, max_length=128, padding=True,
                              return_tensors="pt")
    gold = torch.tensor([raw.labels[i] for i in indices])
    with torch.inference_mode():
        logits = loaded.model.eval()(**inputs).logits.double()
    return torch.softmax(logits, -1)[torch.arange(len(gold)), gold].numpy(), (logits.argmax(-1) == gold).numpy()


def test_data_map_equals_own_forward_passes_at_the_saved_checkpoints(mapped):
    datamap = cartography.read(mapped.out)
    assert datamap is not None and datamap.task == "sst2" and datamap.steps == [2, 4, 6]
    assert datamap.indices == list(range(EXAMPLES))  # iid: the first N training examples
    assert mapped.metadata["cartography"] == {"file": "cartography.json", "examples": EXAMPLES, "records": 3,
                                              "every": 2}
    own = [_gold_probs(str(mapped.out / f"step-{s}") if s < 6 else str(mapped.out), datamap.indices)
           for s in datamap.steps]
    probs = np.stack([p for p, _ in own])
    right = np.stack([r for _, r in own])
    np.testing.assert_allclose(datamap.confidence, probs.mean(0), atol=1e-5)
    np.testing.assert_allclose(datamap.variability, probs.std(0), atol=1e-5)
    np.testing.assert_array_equal(datamap.correctness, right.mean(0))
    rows = datamap.table()
    assert [r["index"] for r in rows] == datamap.indices
    assert {r["region"] for r in rows} <= {"easy", "hard", "ambiguous", "middle"}


def test_recording_does_not_change_the_training(mapped, pico, tmp_path):
    plain = train(TrainConfig(task="sst2", base=str(pico(None)), steps=6, batch_size=4, lr=1e-2, eval_limit=8),
                  tmp_path / "plain")
    assert cartography.read(plain.out) is None and "cartography" not in plain.metadata
    assert plain.metadata["scores"]["dev"] == mapped.metadata["scores"]["dev"]
    assert plain.metadata["train_loss"] == mapped.metadata["train_loss"]


def test_relate_by_hand():
    # four examples of a data map (indices 10..13), a path over examples 13, 12, 11, 99 (99 is not in the map)
    probs = np.array([[0.9, 0.2, 0.5, 0.6], [0.9, 0.4, 0.9, 0.8]])
    datamap = cartography.DataMap("sst2", [10, 11, 12, 13], [1, 2], probs, probs > 0.5)
    matrix = np.array([[1, 0, 1],   # 13: right at both ends, forgotten at the middle (the barrier)
                       [1, 1, 1],   # 12: kept
                       [0, 1, 0],   # 11: not right at both ends
                       [1, 0, 1]],  # 99: not in the map
                      dtype=bool)
    r = cartography.relate(datamap, matrix, [13, 12, 11, 99], barrier=1)
    assert r["shared"] == 3 and r["known_both"] == 2
    assert r["forgotten"]["n"] == 1 and r["forgotten"]["confidence"] == pytest.approx(0.7)
    assert r["forgotten"]["variability"] == pytest.approx(0.1) and r["forgotten"]["correctness"] == 1.0
    assert r["kept"]["n"] == 1 and r["kept"]["confidence"] == pytest.approx(0.7)
    assert r["kept"]["variability"] == pytest.approx(0.2) and r["kept"]["correctness"] == 0.5
    assert r["forgotten_at_barrier"]["n"] == 1
    assert r["all"]["confidence"] == pytest.approx((0.3 + 0.7 + 0.7) / 3)
    assert cartography.relate(datamap, matrix, [1, 2, 3, 4], barrier=1)["shared"] == 0
    # right at A, wrong at B: example 12 (probabilities 0.5, 0.9)
    lost = cartography.relate(datamap, np.array([[1, 0, 1], [1, 1, 0]], dtype=bool), [13, 12], barrier=1)
    assert lost["lost_to_b"]["n"] == 1 and lost["lost_to_b"]["variability"] == pytest.approx(0.2)


def test_a_curve_on_the_data_maps_examples(mapped, pico):
    run = curve(CurveSpec((str(mapped.out), str(pico("sst2", 1))), ("sst2",), points=2, split="train",
                          datamap=str(mapped.out)))
    list(run)
    k = run.summary()["knowledge"]["sst2"]
    assert k["indices"] == list(range(EXAMPLES)) and k["split"] == "train"
    assert k["datamap"]["shared"] == EXAMPLES
    with pytest.raises(ml.MergeLabError, match="no data map"):
        curve(CurveSpec((str(pico("sst2", 0)), str(pico("sst2", 1))), ("sst2",), split="train",
                        datamap=str(pico("sst2", 0))))
    with pytest.raises(ml.MergeLabError, match="classification"):
        cartography.Recorder(ml.get_task("stsb"), None, 4, steps=1, batch_size=1)
    with pytest.raises(ml.MergeLabError, match="one task at a time"):
        train(TrainConfig(task="sst2,cola", base=str(pico(None)), steps=1, cartography=4), mapped.out.parent / "mt")
