"""Decoder-only families: GPT-2, and the Llama layout shared by Llama, Mistral, Qwen2/Qwen3 and Gemma.

- **GPT-2** reproduces transformers' `GPT2Model`, `GPT2LMHeadModel`, `GPT2ForSequenceClassification`
  and `GPT2ForTokenClassification` (the last three wrap the model in `transformer.`; OpenAI's original
  files use the bare names): `wte` / `wpe` embeddings; blocks `h.N` with `ln_1`, the fused
  query-key-value projection `attn.c_attn` (role `qkv`: one matrix of 3 x hidden outputs), `attn.c_proj`,
  `ln_2`, `mlp.c_fc`, `mlp.c_proj`; with `add_cross_attention`, `crossattention.q_attn` (queries),
  `crossattention.c_attn` (fused keys and values, role `cross_kv`), `crossattention.c_proj` and
  `ln_cross_attn`; `ln_f`; `lm_head` (tied to `wte`, absent from saved files); `score` (sequence head)
  or `classifier` (token head). GPT-2's layers are `Conv1D`s, whose weights are stored (in, out), the
  transpose of `nn.Linear`: irrelevant to per-tensor merges, but RegMean and MaTS multiply a weight by
  its input Gram, so those roles are `transposed_roles` (`ParamInfo.transposed`).
  The causal-mask buffers older files carry (`attn.bias`, `attn.masked_bias`) are buffers, not weights.
- **Llama layout** reproduces `LlamaModel` / `LlamaForCausalLM` / `LlamaForSequenceClassification` /
  `LlamaForTokenClassification` and the same classes of Mistral, Qwen2 (biases on q/k/v), Qwen3 (per-head
  `q_norm` / `k_norm`) and Gemma (tied `lm_head`), all wrapping the model in `model.`:
  `embed_tokens`; `layers.N.self_attn.{q,k,v,o}_proj` (k/v narrower under grouped-query attention);
  the gated MLP `mlp.gate_proj` (role `ff_gate`), `mlp.up_proj` (`ff_in`), `mlp.down_proj` (`ff_out`);
  `input_layernorm`, `post_attention_layernorm`; `norm`; `lm_head` (tied or untied); `score`. The
  rotary tables older files carry (`rotary_emb.inv_freq`) and Gemma's `embed_scale` are buffers.
  Gemma 2/3 add two norms per block under names that mean something else here (their
  `post_attention_layernorm` follows attention), so they are left to the generic fallback rather than
  described wrongly.

Both families are pre-LN: `ln_attn` / `ln_ff` are the norms *before* attention / the MLP (GPT-2's
`ln_1` / `ln_2`, Llama's `input_layernorm` / `post_attention_layernorm`), `ln_final` the last norm.

Both have statistics and scoring (`SCORED`): their sequence heads (`score`) read the last non-padding
token (`last_token_head`), their causal LMs are scored by next-token loss on text tasks. Both train
(`training`): sequence and token classifiers (full, LoRA, (IA)³) and causal LMs on text tasks.
"""

from __future__ import annotations

from .core import SCORED, WB, Adapter

_H = r"h\.(?P<layer>\d+)\."

GPT2 = Adapter(
    family="gpt2",
    model_types=("gpt2",),
    prefixes=("transformer.",),
    features=SCORED + ("training", "alignment"),
    transposed_roles=("qkv", "attn_out", "ff_in", "ff_out", "cross_query", "cross_kv", "cross_out"),
    last_token_head=True,
    rules=(
        (r"wte\.weight", "embeddings", "word"),
        (r"wpe\.weight", "embeddings", "position"),
        (_H + r"ln_1" + WB, "layer_norm", "ln_attn"),
        (_H + r"attn\.c_attn" + WB, "attention", "qkv"),
        (_H + r"attn\.c_proj" + WB, "attention", "attn_out"),
        (_H + r"attn\.(?:bias|masked_bias)", "buffer", "buffer"),
        (_H + r"ln_cross_attn" + WB, "layer_norm", "ln_cross"),
        (_H + r"crossattention\.q_attn" + WB, "attention", "cross_query"),
        (_H + r"crossattention\.c_attn" + WB, "attention", "cross_kv"),
        (_H + r"crossattention\.c_proj" + WB, "attention", "cross_out"),
        (_H + r"crossattention\.(?:bias|masked_bias)", "buffer", "buffer"),
        (_H + r"ln_2" + WB, "layer_norm", "ln_ff"),
        (_H + r"mlp\.c_fc" + WB, "feed_forward", "ff_in"),
        (_H + r"mlp\.c_proj" + WB, "feed_forward", "ff_out"),
        (r"ln_f" + WB, "layer_norm", "ln_final"),
        (r"lm_head\.weight", "lm_head", "lm_decoder"),
        (r"(?:score|classifier)" + WB, "head", "classifier"),
    ),
)

_L = r"layers\.(?P<layer>\d+)\."

LLAMA = Adapter(
    family="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3", "gemma"),
    prefixes=("model.",),
    features=SCORED + ("training", "alignment"),
    last_token_head=True,
    rules=(
        (r"embed_tokens\.weight", "embeddings", "word"),
        (_L + r"self_attn\.q_proj" + WB, "attention", "query"),
        (_L + r"self_attn\.k_proj" + WB, "attention", "key"),
        (_L + r"self_attn\.v_proj" + WB, "attention", "value"),
        (_L + r"self_attn\.o_proj" + WB, "attention", "attn_out"),
        (_L + r"self_attn\.q_norm\.weight", "layer_norm", "ln_query"),
        (_L + r"self_attn\.k_norm\.weight", "layer_norm", "ln_key"),
        (r"(?:" + _L + r"self_attn\.)?rotary_emb\.(?:original_)?inv_freq", "buffer", "buffer"),
        (r"embed_tokens\.embed_scale", "buffer", "buffer"),  # Gemma's sqrt(hidden) scale
        (_L + r"mlp\.gate_proj" + WB, "feed_forward", "ff_gate"),
        (_L + r"mlp\.up_proj" + WB, "feed_forward", "ff_in"),
        (_L + r"mlp\.down_proj" + WB, "feed_forward", "ff_out"),
        (_L + r"input_layernorm\.weight", "layer_norm", "ln_attn"),
        (_L + r"post_attention_layernorm\.weight", "layer_norm", "ln_ff"),
        (r"norm\.weight", "layer_norm", "ln_final"),
        (r"lm_head\.weight", "lm_head", "lm_decoder"),
        (r"(?:score|classifier)" + WB, "head", "classifier"),
    ),
)
