"""The BERT-family adapter maps every parameter to a group and role."""

from __future__ import annotations

import pytest
from transformers import (BertConfig, BertForMaskedLM, BertForSequenceClassification, BertForTokenClassification,
                          BertModel, RobertaConfig, RobertaForSequenceClassification)

from merging_core import arch
from merging_core.errors import MergeLabError

SMALL = dict(vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)


@pytest.mark.parametrize("cls", [BertModel, BertForSequenceClassification, BertForTokenClassification, BertForMaskedLM])
def test_every_bert_parameter_has_a_group(cls):
    model = cls(BertConfig(**SMALL))
    names = list(model.state_dict())
    groups = arch.group_params(names, "bert")
    grouped = [n for g in groups.values() for n in g]
    buffers = [n for n in names if arch.BERT.describe(n).group == "buffer"]
    assert sorted(grouped + buffers) == sorted(names)
    per_layer = {arch.BERT.describe(n).role for n in groups["attention"] if arch.BERT.describe(n).layer == 1}
    assert per_layer == {"query", "key", "value", "attn_out"}
    assert len(groups["attention"]) == 2 * 4 * 2 and len(groups["feed_forward"]) == 2 * 2 * 2
    assert len(groups["layer_norm"]) == 2 + 2 * 2 * 2  # embeddings LN + two per layer
    if cls is BertForMaskedLM:
        assert not groups["head"] and {arch.BERT.describe(n).role for n in groups["mlm_head"]} >= {"mlm_decoder", "mlm_bias"}
    elif cls is BertModel:
        assert not groups["head"] and groups["pooler"]
    else:
        assert groups["head"] == ["classifier.weight", "classifier.bias"]


def test_roberta_head_and_prefix():
    model = RobertaForSequenceClassification(RobertaConfig(**SMALL, max_position_embeddings=40))
    groups = arch.group_params(list(model.state_dict()), "roberta")
    assert set(groups["head"]) == {"classifier.dense.weight", "classifier.dense.bias",
                                   "classifier.out_proj.weight", "classifier.out_proj.bias"}


def test_peft_names_map_to_the_adapted_layer():
    info = arch.BERT.describe("base_model.model.bert.encoder.layer.3.attention.self.value.lora_B.default.weight")
    assert (info.group, info.role, info.layer, info.factor) == ("attention", "value", 3, "B")
    head = arch.BERT.describe("base_model.model.classifier.modules_to_save.default.weight")
    assert (head.group, head.factor) == ("head", None)


def test_unknown_names_and_types_are_errors():
    with pytest.raises(MergeLabError, match="not known to the bert adapter"):
        arch.BERT.describe("encoder.layer.0.mystery.weight")
    with pytest.raises(MergeLabError, match="model type 'mystery' is not supported yet"):
        arch.adapter_for("mystery")
