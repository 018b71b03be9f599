"""Encoder-only families: BERT (with RoBERTa, XLM-R, ELECTRA), DistilBERT and DeBERTa-v2/v3.

Each adapter reproduces the parameter names of the transformers model classes of its family, in
every task wrapper MergeLab meets (the bare `*Model`, `*ForSequenceClassification`,
`*ForTokenClassification`, `*ForMaskedLM`), with and without the wrapper's prefix (`bert.`,
`distilbert.`, `deberta.`).

- **BERT** (`BertModel`, `RobertaModel`, `XLMRobertaModel`, `ElectraModel`): post-LN blocks of
  `attention.self.{query,key,value}`, `attention.output.dense` + LayerNorm, `intermediate.dense`,
  `output.dense` + LayerNorm; a pooler; `classifier` heads (RoBERTa's `classifier.dense/out_proj`); MLM
  heads `cls.predictions.*` (BERT) or `lm_head.*` (RoBERTa). The only family with every feature.
- **DistilBERT** (`DistilBertModel`): `transformer.layer.N.attention.{q,k,v,out}_lin`, `sa_layer_norm`
  (after attention), `ffn.lin1/lin2`, `output_layer_norm`; no pooler: its sequence head is
  `pre_classifier` + `classifier`; the MLM head is `vocab_transform`, `vocab_layer_norm`,
  `vocab_projector` (weight tied to the word embeddings, bias its own).
- **DeBERTa-v2/v3** (`DebertaV2Model`): BERT's block layout with `attention.self.{query,key,value}_proj`,
  plus `pos_key_proj`/`pos_query_proj` when a checkpoint does not share them with the content projections
  (`share_att_key=False`); the relative position table `encoder.rel_embeddings` (grouped with the
  embeddings: it is an embedding table, read by every layer's attention) and its `encoder.LayerNorm`;
  DeBERTa-v2's optional convolution over layer 0's output (`encoder.conv`, grouped with the feed-forward
  blocks: it transforms hidden states outside attention, as they do); the `ContextPooler`
  (`pooler.dense`, outside the `deberta.` prefix) and `classifier`; both MLM head layouts of
  transformers 5 (`legacy=True`: `cls.predictions.*` like BERT; `legacy=False`:
  `lm_predictions.lm_head.{dense,LayerNorm,bias}`, whose decoder is the word embedding matrix itself).

DistilBERT and DeBERTa-v2 have statistics and scoring of their sequence and token heads (`SCORED`); their
masked-LM heads are not single modules MergeLab can run on the masked positions alone, so they are not
scored yet.

Layer-norm roles name the sub-block a norm belongs to: `ln_attn` (attention) and `ln_ff`
(feed-forward); in these post-LN families the norm follows its sub-block.
"""

from __future__ import annotations

from .core import FEATURES, SCORED, Adapter
from .core import WB as _WB

_LAYER = r"encoder\.layer\.(?P<layer>\d+)\."

BERT = Adapter(
    family="bert",
    model_types=("bert", "roberta", "xlm-roberta", "electra"),
    prefixes=("bert.", "roberta.", "electra."),
    mlm_head_attr="cls",
    features=FEATURES,
    rules=(
        (r"embeddings\.word_embeddings\.weight", "embeddings", "word"),
        (r"embeddings\.position_embeddings\.weight", "embeddings", "position"),
        (r"embeddings\.token_type_embeddings\.weight", "embeddings", "token_type"),
        (r"embeddings\.LayerNorm" + _WB, "layer_norm", "ln_embeddings"),
        (r"embeddings\.(?:position_ids|token_type_ids)", "buffer", "buffer"),
        (_LAYER + r"attention\.self\.query" + _WB, "attention", "query"),
        (_LAYER + r"attention\.self\.key" + _WB, "attention", "key"),
        (_LAYER + r"attention\.self\.value" + _WB, "attention", "value"),
        (_LAYER + r"attention\.output\.dense" + _WB, "attention", "attn_out"),
        (_LAYER + r"attention\.output\.LayerNorm" + _WB, "layer_norm", "ln_attn"),
        (_LAYER + r"intermediate\.dense" + _WB, "feed_forward", "ff_in"),
        (_LAYER + r"output\.dense" + _WB, "feed_forward", "ff_out"),
        (_LAYER + r"output\.LayerNorm" + _WB, "layer_norm", "ln_ff"),
        (r"pooler\.dense" + _WB, "pooler", "pooler"),
        (r"classifier(?:\.dense|\.out_proj)?" + _WB, "head", "classifier"),
        (r"(?:cls\.predictions\.transform\.dense|lm_head\.dense)" + _WB, "mlm_head", "mlm_transform"),
        (r"(?:cls\.predictions\.transform\.LayerNorm|lm_head\.layer_norm)" + _WB, "mlm_head", "mlm_layer_norm"),
        (r"(?:cls\.predictions|lm_head)\.decoder" + _WB, "mlm_head", "mlm_decoder"),
        (r"(?:cls\.predictions|lm_head)\.bias", "mlm_head", "mlm_bias"),
    ),
)

_DISTIL = r"transformer\.layer\.(?P<layer>\d+)\."

DISTILBERT = Adapter(
    family="distilbert",
    model_types=("distilbert",),
    prefixes=("distilbert.",),
    features=SCORED,
    rules=(
        (r"embeddings\.word_embeddings\.weight", "embeddings", "word"),
        (r"embeddings\.position_embeddings\.weight", "embeddings", "position"),
        (r"embeddings\.LayerNorm" + _WB, "layer_norm", "ln_embeddings"),
        (r"embeddings\.position_ids", "buffer", "buffer"),
        (_DISTIL + r"attention\.q_lin" + _WB, "attention", "query"),
        (_DISTIL + r"attention\.k_lin" + _WB, "attention", "key"),
        (_DISTIL + r"attention\.v_lin" + _WB, "attention", "value"),
        (_DISTIL + r"attention\.out_lin" + _WB, "attention", "attn_out"),
        (_DISTIL + r"sa_layer_norm" + _WB, "layer_norm", "ln_attn"),
        (_DISTIL + r"ffn\.lin1" + _WB, "feed_forward", "ff_in"),
        (_DISTIL + r"ffn\.lin2" + _WB, "feed_forward", "ff_out"),
        (_DISTIL + r"output_layer_norm" + _WB, "layer_norm", "ln_ff"),
        (r"pre_classifier" + _WB, "head", "pre_classifier"),
        (r"classifier" + _WB, "head", "classifier"),
        (r"vocab_transform" + _WB, "mlm_head", "mlm_transform"),
        (r"vocab_layer_norm" + _WB, "mlm_head", "mlm_layer_norm"),
        (r"vocab_projector\.weight", "mlm_head", "mlm_decoder"),
        (r"vocab_projector\.bias", "mlm_head", "mlm_bias"),
    ),
)

DEBERTA_V2 = Adapter(
    family="deberta-v2",
    model_types=("deberta-v2",),
    prefixes=("deberta.",),
    features=SCORED,
    rules=(
        (r"embeddings\.word_embeddings\.weight", "embeddings", "word"),
        (r"embeddings\.position_embeddings\.weight", "embeddings", "position"),  # position_biased_input only
        (r"embeddings\.token_type_embeddings\.weight", "embeddings", "token_type"),  # type_vocab_size > 0 only
        (r"embeddings\.embed_proj\.weight", "embeddings", "embed_proj"),  # embedding_size != hidden_size only
        (r"embeddings\.LayerNorm" + _WB, "layer_norm", "ln_embeddings"),
        (r"embeddings\.(?:position_ids|token_type_ids)", "buffer", "buffer"),
        (_LAYER + r"attention\.self\.query_proj" + _WB, "attention", "query"),
        (_LAYER + r"attention\.self\.key_proj" + _WB, "attention", "key"),
        (_LAYER + r"attention\.self\.value_proj" + _WB, "attention", "value"),
        (_LAYER + r"attention\.self\.pos_query_proj" + _WB, "attention", "pos_query"),
        (_LAYER + r"attention\.self\.pos_key_proj" + _WB, "attention", "pos_key"),
        (_LAYER + r"attention\.output\.dense" + _WB, "attention", "attn_out"),
        (_LAYER + r"attention\.output\.LayerNorm" + _WB, "layer_norm", "ln_attn"),
        (_LAYER + r"intermediate\.dense" + _WB, "feed_forward", "ff_in"),
        (_LAYER + r"output\.dense" + _WB, "feed_forward", "ff_out"),
        (_LAYER + r"output\.LayerNorm" + _WB, "layer_norm", "ln_ff"),
        (r"encoder\.rel_embeddings\.weight", "embeddings", "relative_position"),
        (r"encoder\.LayerNorm" + _WB, "layer_norm", "ln_relative_position"),
        (r"encoder\.conv\.conv" + _WB, "feed_forward", "conv"),
        (r"encoder\.conv\.LayerNorm" + _WB, "layer_norm", "ln_conv"),
        (r"pooler\.dense" + _WB, "pooler", "pooler"),
        (r"classifier" + _WB, "head", "classifier"),
        (r"(?:cls\.predictions\.transform\.dense|lm_predictions\.lm_head\.dense)" + _WB, "mlm_head", "mlm_transform"),
        (r"(?:cls\.predictions\.transform\.LayerNorm|lm_predictions\.lm_head\.LayerNorm)" + _WB, "mlm_head",
         "mlm_layer_norm"),
        (r"cls\.predictions\.decoder" + _WB, "mlm_head", "mlm_decoder"),
        (r"(?:cls\.predictions|lm_predictions\.lm_head)\.bias", "mlm_head", "mlm_bias"),
    ),
)
