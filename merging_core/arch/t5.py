"""The T5 family: an encoder-decoder, adapted so that its two stacks never share a layer index.

Reproduces the parameter names of transformers' `T5Model`, `T5EncoderModel`,
`T5ForConditionalGeneration`, `T5ForSequenceClassification` and `T5ForTokenClassification` (the last
two wrap the model in `transformer.`), and of `MT5*` and `UMT5*`, which share T5's module names:

- `shared` (the token embeddings) and its tied views `encoder.embed_tokens` / `decoder.embed_tokens`,
  which older files may hold as copies;
- per block: `layer.0.SelfAttention.{q,k,v,o}` (+ `relative_attention_bias`, in block 0 only for T5,
  in every block for UMT5) and its `layer_norm`; in the decoder `layer.1.EncDecAttention.{q,k,v,o}`
  (cross-attention) and its `layer_norm`; the feed-forward block (`layer.1` in the encoder, `layer.2` in
  the decoder): `DenseReluDense.wi/wo` (T5 v1.0) or the gated `wi_0` (gate) / `wi_1` (up) / `wo` (T5
  v1.1, Flan-T5, mT5), and its `layer_norm`;
- `encoder.final_layer_norm`, `decoder.final_layer_norm`; `lm_head` (tied to `shared` in T5 v1.0 and
  then absent from saved files, its own matrix in v1.1 / Flan-T5 / mT5); `classification_head.{dense,
  out_proj}` of the sequence classifier, `classifier` of the token classifier.

**Encoder and decoder blocks.** Both stacks number their blocks from 0, so `layer` alone would put
decoder block 0 and encoder block 0 in one bucket. Every parameter inside a stack records it in
`ParamInfo.stack` ("encoder" / "decoder"), and per-layer consumers key on `ParamInfo.block` =
(stack, layer). A stack field rather than decoder-only roles (`dec_query`, ...) keeps one role
vocabulary for every family: a decoder self-attention query is still a `query`, and code that selects
roles (component selection, a future alignment of T5) needs no second list. Cross-attention is a
different computation (queries from the decoder, keys and values from the encoder output), so it has
roles of its own: `cross_query`, `cross_key`, `cross_value`, `cross_out`, `ln_cross`.

T5 is pre-LN: `ln_attn`, `ln_cross` and `ln_ff` are the norms *before* their sub-blocks, and
`ln_final` the stack's last norm. The gated feed-forward's `wi_0` is `ff_gate` and `wi_1` is `ff_in`,
as Llama's `gate_proj` / `up_proj` (both read the block's input; the gate goes through the activation).
"""

from __future__ import annotations

from .core import SCORED, Adapter

_BLOCK = r"(?P<stack>encoder|decoder)\.block\.(?P<layer>\d+)\.layer\."
_ENC = r"(?P<stack>encoder)\.block\.(?P<layer>\d+)\.layer\."
_DEC = r"(?P<stack>decoder)\.block\.(?P<layer>\d+)\.layer\."
_W = r"\.weight"  # T5 layers have no biases


def _feed_forward(name: str, group: str, role: str) -> tuple[tuple[str, str, str], ...]:
    """One rule per stack: the feed-forward sub-block is `layer.1` of an encoder block, `layer.2` of a decoder
    block (after cross-attention); a regex cannot name one group twice, hence two rules."""
    return (_ENC + r"1\." + name + _W, group, role), (_DEC + r"2\." + name + _W, group, role)


T5 = Adapter(
    family="t5",
    model_types=("t5", "mt5", "umt5"),
    prefixes=("transformer.",),
    # a T5 with its LM head is a language model: text by span corruption (`spans`), classification tasks by
    # rank classification (`prompts`), for scoring, statistics and training alike; no alignment yet
    features=SCORED + ("training",),
    rules=(
        (r"shared" + _W, "embeddings", "word"),
        (r"(?P<stack>encoder|decoder)\.embed_tokens" + _W, "embeddings", "word"),
        (_BLOCK + r"0\.SelfAttention\.q" + _W, "attention", "query"),
        (_BLOCK + r"0\.SelfAttention\.k" + _W, "attention", "key"),
        (_BLOCK + r"0\.SelfAttention\.v" + _W, "attention", "value"),
        (_BLOCK + r"0\.SelfAttention\.o" + _W, "attention", "attn_out"),
        (_BLOCK + r"0\.SelfAttention\.relative_attention_bias" + _W, "attention", "position_bias"),
        (_BLOCK + r"0\.layer_norm" + _W, "layer_norm", "ln_attn"),
        (_DEC + r"1\.EncDecAttention\.q" + _W, "attention", "cross_query"),
        (_DEC + r"1\.EncDecAttention\.k" + _W, "attention", "cross_key"),
        (_DEC + r"1\.EncDecAttention\.v" + _W, "attention", "cross_value"),
        (_DEC + r"1\.EncDecAttention\.o" + _W, "attention", "cross_out"),
        (_DEC + r"1\.EncDecAttention\.relative_attention_bias" + _W, "attention", "cross_position_bias"),
        (_DEC + r"1\.layer_norm" + _W, "layer_norm", "ln_cross"),
        *_feed_forward(r"DenseReluDense\.(?:wi|wi_1)", "feed_forward", "ff_in"),
        *_feed_forward(r"DenseReluDense\.wi_0", "feed_forward", "ff_gate"),
        *_feed_forward(r"DenseReluDense\.wo", "feed_forward", "ff_out"),
        *_feed_forward(r"layer_norm", "layer_norm", "ln_ff"),
        (r"(?P<stack>encoder|decoder)\.final_layer_norm" + _W, "layer_norm", "ln_final"),
        (r"lm_head" + _W, "lm_head", "lm_decoder"),
        (r"classification_head\.(?:dense|out_proj)\.(?:weight|bias)", "head", "classifier"),
        (r"classifier\.(?:weight|bias)", "head", "classifier"),
    ),
)
