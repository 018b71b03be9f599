"""Models pretrained from scratch: which random initialization a `scratch:` spec names.

Three families start from random weights, all with the packaged MiniLM's WordPiece tokenizer (so nothing is
downloaded) and all sized to pretrain on a CPU:

- `scratch:<size>` (tiny, mini, small): a BERT (Devlin et al. 2019, arXiv:1810.04805), pretrained by masked
  language modelling; the sizes are the names of Turc et al. 2019's compact BERTs (arXiv:1908.08962).
- `scratch-llama:<size>` (tiny, mini, small): a decoder in the Llama layout (Touvron et al. 2023,
  arXiv:2302.13971, Sec. 2.2): RMSNorm before each sub-layer, a SwiGLU gated MLP, rotary position
  embeddings, here with grouped-query attention over 2 key/value heads (Ainslie et al. 2023,
  arXiv:2305.13245) and the LM head tied to the token embeddings; pretrained by next-token prediction.
  Widths and depths are the BERT sizes of the same name. The gated MLP has three matrices where BERT's has
  two, so its width is Llama's 8/3 x hidden (Sec. 2.2) rounded up to a multiple of 64, which keeps the
  feed-forward parameters close to the BERT of the same size; the head counts are the BERT's doubled for
  `tiny` (2 query heads over 2 key/value heads would not group anything).
- `scratch-t5:<size>` (tiny, mini, small): an encoder-decoder in the T5 v1.1 layout (Raffel et al. 2020,
  arXiv:1910.10683; v1.1's gated-GELU feed-forward), pretrained by span corruption (`spans`), with the
  LM head tied to the embeddings as in T5 v1.0 (which keeps a small model's vocabulary parameters
  halved) and no dropout (pretraining this short does not overfit). Encoder and decoder each have the
  BERT size's depth, its width and heads, and the Llama size's gated feed-forward width. Its tokenizer is
  MiniLM's plus T5's 100 sentinel tokens `<extra_id_0>` ... `<extra_id_99>`, which span corruption
  needs; pad is the decoder's start token, as in T5.

The caller's torch seed decides the weights (`models.load` builds the model from the config), so a run's
recorded seed names its initialization (`align.origin`).
"""

from __future__ import annotations

import copy
import threading

from .errors import MergeLabError
from .spans import sentinel_names

BERT = "scratch:"
LLAMA = "scratch-llama:"
T5 = "scratch-t5:"

# BERT sizes to pretrain from scratch on a CPU (the names of Turc et al. 2019's compact BERTs).
BERT_SIZES = {
    "tiny": {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 512},
    "mini": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 1024},
    "small": {"hidden_size": 512, "num_hidden_layers": 4, "num_attention_heads": 8, "intermediate_size": 2048},
}
# Llama-layout decoders of the same widths and depths (see the module doc for the head counts and MLP width).
LLAMA_SIZES = {
    "tiny": {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 384},
    "mini": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 704},
    "small": {"hidden_size": 512, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
              "intermediate_size": 1408},
}
# T5 encoder-decoders: each stack as deep as the BERT size, the Llama size's gated feed-forward width.
T5_SIZES = {size: {"d_model": b["hidden_size"], "num_layers": b["num_hidden_layers"], "num_heads": heads,
                   "d_kv": b["hidden_size"] // heads, "d_ff": LLAMA_SIZES[size]["intermediate_size"]}
            for size, b in BERT_SIZES.items() for heads in [LLAMA_SIZES[size]["num_attention_heads"]]}
# prefix -> (transformers config class, sizes)
FAMILIES = {BERT: ("BertConfig", BERT_SIZES), LLAMA: ("LlamaConfig", LLAMA_SIZES), T5: ("T5Config", T5_SIZES)}
_SENTINEL_TOKENIZERS: dict[int, tuple[object, object]] = {}  # id(MiniLM's tokenizer) -> (it, it + sentinels)
_LOCK = threading.Lock()
MAX_POSITIONS = 512  # as the BERT sizes' learned position table; rotary positions need no table


def is_scratch(spec: object) -> bool:
    """True for a spec naming a random initialization (`scratch:mini`, `scratch-llama:tiny`), known size or not."""
    return isinstance(spec, str) and spec.startswith(tuple(FAMILIES))


def known(spec: str) -> bool:
    """True for a scratch spec of a known family and size."""
    prefix = _prefix(spec)
    return prefix is not None and spec[len(prefix):] in FAMILIES[prefix][1]


def check(spec: str) -> None:
    """Fail with one line naming the sizes when `spec` is a scratch spec of an unknown size."""
    if is_scratch(spec) and not known(spec):
        prefix = _prefix(spec)
        raise MergeLabError(f"unknown scratch size {spec!r}; use one of: "
                            + ", ".join(prefix + size for size in FAMILIES[prefix][1]))


def config_kwargs(spec: str, tokenizer) -> tuple[str, dict]:
    """(transformers config class name, its keyword arguments) of the random initialization `spec` names,
    for a model reading `tokenizer` (MiniLM's)."""
    check(spec)
    prefix = _prefix(spec)
    if prefix is None:
        raise MergeLabError(f"{spec!r} is not a scratch spec (scratch:<size>, scratch-llama:<size> or "
                            "scratch-t5:<size>)")
    class_name, sizes = FAMILIES[prefix]
    kwargs = {"vocab_size": len(tokenizer), **sizes[spec[len(prefix):]]}
    if prefix == LLAMA:
        # The WordPiece tokenizer frames text as [CLS] ... [SEP] and pads with [PAD]: those are the decoder's
        # BOS, EOS and pad ids, so the sequence head finds the last real token of right-padded batches.
        kwargs.update(max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=True,
                      pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
                      eos_token_id=tokenizer.sep_token_id)
    if prefix == T5:
        kwargs.update(feed_forward_proj="gated-gelu", tie_word_embeddings=True, dropout_rate=0.0,
                      pad_token_id=tokenizer.pad_token_id, decoder_start_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.sep_token_id)
    return class_name, kwargs


def tokenizer(spec: str, minilm):
    """The tokenizer of the random initialization `spec` names, given MiniLM's: MiniLM's itself, or for a T5
    a copy with T5's sentinel tokens added (one per MiniLM tokenizer object, never changing that one)."""
    if _prefix(spec) != T5:
        return minilm
    with _LOCK:
        known = _SENTINEL_TOKENIZERS.get(id(minilm))
        if known is None or known[0] is not minilm:
            extended = copy.deepcopy(minilm)
            extended.add_special_tokens({"additional_special_tokens": sentinel_names()})
            known = _SENTINEL_TOKENIZERS[id(minilm)] = (minilm, extended)
    return known[1]


def _prefix(spec: str) -> str | None:
    # the longest prefix first, should one ever be a prefix of another
    return next((p for p in sorted(FAMILIES, key=len, reverse=True) if spec.startswith(p)), None)
