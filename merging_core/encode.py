"""Tokenize a task split once, cache it, and cut it into padded batches.

A split is tokenized once per (tokenizer, task, split, max length, data file content) and kept in memory and
on disk under `$MERGELAB_HOME/cache/tokenized` as safetensors (ragged sequences stored flat with
offsets; no pickle). Token tasks label the first sub-word of every word (others get -100) and keep
the word-level gold tags, so span F1 is computed on whole sentences even when one is truncated.
MLM splits are the text cut into blocks of `max_length` tokens; masking happens later (`mlm_mask`)
with an explicit generator, so evaluation masks are fixed by a seed. The same blocks serve causal LMs
(next-token loss): a BERT-style tokenizer frames each block with [CLS] ... [SEP], a decoder's tokenizer
(no CLS/SEP) starts it with its BOS token when it has one, as it starts any text. A classification task
scored by rank classification (kind "rank") is its examples as prompts, with the labels' verbalizers
(`prompts`).

Batches are always right-padded (`Encoded.batch`), with `pad_id(tokenizer)`: the tokenizer's pad token,
else its EOS token (GPT-2 and Llama tokenizers have no pad token), else id 0. The user's tokenizer is
never changed; padding is masked by the attention mask, and `model_inputs` leaves out what a family's
forward must not see.
"""

from __future__ import annotations

import hashlib
import json
import threading
import weakref
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import caches, data, prompts, settings
from .tasks import TaskSpec

FORMAT_VERSION = 1
IGNORE = -100
# Tokenized splits in memory: bounded in bytes with every other engine cache and dropped when idle (`caches`).
_MEMORY = caches.Cache("tokenized", lambda e: e.nbytes, max_entries=24)
# tokenizer -> hash of its definition, for as long as the tokenizer lives (weak keys: this map never keeps
# a tokenizer alive, and an entry cannot outlive its tokenizer, so a reused id is never mistaken for it)
_TOKENIZER_FP: weakref.WeakKeyDictionary[object, str] = weakref.WeakKeyDictionary()
_TOKENIZER_FP_LOCK = threading.Lock()


@dataclass
class Encoded:
    """A tokenized split; example i spans `ids[offsets[i]:offsets[i+1]]`."""

    ids: torch.Tensor  # int32, all examples concatenated
    offsets: torch.Tensor  # int64, n + 1
    labels: torch.Tensor  # (n,) long / float for sequence tasks; aligned with `ids` for token and MLM tasks
    type_ids: torch.Tensor | None = None  # int8, aligned with `ids` (sentence-pair tasks)
    word_labels: torch.Tensor | None = None  # token tasks: gold tag of every word, concatenated
    word_offsets: torch.Tensor | None = None  # token tasks: n + 1
    # rank classification: each label's verbalizer ids, (labels, longest verbalizer), padded with -1; every
    # batch carries them, so whatever takes a batch (training, statistics, scoring) knows the candidates
    choices: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def nbytes(self) -> int:
        """The memory its tensors hold (views of one storage counted once)."""
        storages = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        return sum(storages.values())

    @property
    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    @property
    def token_level(self) -> bool:
        # Every example has at least [CLS] and [SEP], so per-token labels always outnumber examples.
        return self.labels.shape[0] != len(self)

    def head(self, n: int | None) -> "Encoded":
        """The first `n` examples (all when n is None), sharing storage."""
        if n is None or n >= len(self):
            return self
        end = int(self.offsets[n])
        changes = {"ids": self.ids[:end], "offsets": self.offsets[: n + 1]}
        changes["labels"] = self.labels[:end] if self.token_level else self.labels[:n]
        if self.type_ids is not None:
            changes["type_ids"] = self.type_ids[:end]
        if self.word_offsets is not None:
            changes["word_offsets"] = self.word_offsets[: n + 1]
            changes["word_labels"] = self.word_labels[: int(self.word_offsets[n])]
        return replace(self, **changes)

    def subset(self, index: torch.Tensor) -> "Encoded":
        """Examples `index` in that order (a copy), e.g. one data partition."""
        spans = [(int(self.offsets[i]), int(self.offsets[i + 1])) for i in index.tolist()]
        gather = torch.cat([torch.arange(a, b) for a, b in spans]) if spans else torch.zeros(0, dtype=torch.long)
        lengths = torch.tensor([b - a for a, b in spans], dtype=torch.long)
        changes = {"ids": self.ids[gather], "offsets": torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])}
        changes["labels"] = self.labels[gather] if self.token_level else self.labels[index]
        if self.type_ids is not None:
            changes["type_ids"] = self.type_ids[gather]
        if self.word_offsets is not None:
            word_spans = [(int(self.word_offsets[i]), int(self.word_offsets[i + 1])) for i in index.tolist()]
            changes["word_labels"] = torch.cat([self.word_labels[a:b] for a, b in word_spans])
            word_lengths = torch.tensor([b - a for a, b in word_spans], dtype=torch.long)
            changes["word_offsets"] = torch.cat([torch.zeros(1, dtype=torch.long), word_lengths.cumsum(0)])
        return replace(self, **changes)

    def batch(self, index: torch.Tensor, pad_id: int) -> dict[str, torch.Tensor]:
        """Examples `index` right-padded to the longest of them."""
        starts, lengths = self.offsets[index], self.lengths[index]
        width = int(lengths.max())
        # One gather instead of a Python loop: position j of row r reads ids[starts[r] + j] when j < length.
        cols = torch.arange(width)
        valid = cols[None, :] < lengths[:, None]
        source = (starts[:, None] + cols[None, :]).clamp(max=len(self.ids) - 1)
        out = {
            "input_ids": torch.where(valid, self.ids[source].long(), pad_id),
            "attention_mask": valid.long(),
        }
        if self.type_ids is not None:
            out["token_type_ids"] = torch.where(valid, self.type_ids[source].long(), 0)
        out["labels"] = torch.where(valid, self.labels[source], IGNORE) if self.token_level else self.labels[index]
        if self.choices is not None:
            out["choices"] = self.choices
        return out

    def word_tags(self, i: int) -> list[int]:
        return self.word_labels[int(self.word_offsets[i]): int(self.word_offsets[i + 1])].tolist()


def pad_id(tokenizer) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its EOS token, else 0. Decoder
    tokenizers (GPT-2, Llama) define no pad token; EOS is what transformers' examples pad them with, and
    padding is masked anyway (a sequence head finds the last real token through `config.pad_token_id`,
    which `models.match_padding` sets to this id on the loaded model)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def model_inputs(batch: dict[str, torch.Tensor], config=None) -> dict[str, torch.Tensor]:
    """The inputs a model's forward takes from a batch: everything but the labels, and token type ids only
    for models with token-type embeddings (`config.type_vocab_size` > 0: BERT, RoBERTa, ELECTRA).

    Decided by the config, not by the forward's signature: DistilBERT's and Llama's forwards have no such
    argument, DeBERTa-v2 ignores it without type embeddings (its default `type_vocab_size=0`), and GPT-2's
    forward accepts it but embeds the ids with its *word* embeddings, so zeros would add the embedding of
    token 0 to every position: a model it was never trained to be. A tokenizer that is not the family's own
    (a generic fast tokenizer) produces type ids for any of them."""
    types = getattr(config, "type_vocab_size", 0) if config is not None else 1
    return {k: v for k, v in batch.items()
            if k not in ("labels", "choices") and (k != "token_type_ids" or (types or 0) > 0)}


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the tokenizer's full definition (vocabulary, normalizer, special tokens)."""
    try:
        with _TOKENIZER_FP_LOCK:
            known = _TOKENIZER_FP.get(tokenizer)
    except TypeError:  # a tokenizer that takes no weak reference: hashed every time
        known = None
    if known is None:
        definition = tokenizer.backend_tokenizer.to_str() if tokenizer.is_fast else json.dumps(tokenizer.get_vocab())
        known = hashlib.sha1(definition.encode()).hexdigest()[:16]
        try:
            with _TOKENIZER_FP_LOCK:
                _TOKENIZER_FP[tokenizer] = known
        except TypeError:
            pass
    return known


def encode(spec: TaskSpec, split: str, tokenizer, max_length: int = 128) -> Encoded:
    """The tokenized `split` of `spec`, from the memory or disk cache when it was made before."""
    fingerprint = data.local_fingerprint(spec, split)
    raw = None
    if fingerprint is None:  # hub data: its fingerprint is known only after loading
        raw = data.load_split(spec, split)
        fingerprint = raw.fingerprint
    key_parts = [FORMAT_VERSION, tokenizer_fingerprint(tokenizer), spec.name, split, max_length, fingerprint]
    if spec.kind == "rank":  # the same split as prompts: its own entry, keyed by the prompt and its framing
        key_parts += [spec.prompt.template, spec.prompt.verbalizers, prompts.start_ids(tokenizer),
                      prompts.end_ids(tokenizer)]
    key = hashlib.sha1(json.dumps(key_parts).encode()).hexdigest()[:20]
    known = _MEMORY.get(key)
    if known is not None:
        return known
    path = settings.cache_dir("tokenized") / f"{spec.name}-{split}-{key}.safetensors"
    encoded = None
    if path.is_file():
        try:
            encoded = Encoded(**load_file(path))
        except (SafetensorError, OSError, TypeError, ValueError):  # a damaged cache entry: tokenize again
            encoded = None
    if encoded is None:
        raw = raw or data.load_split(spec, split)
        encoded = _tokenize(spec, raw, tokenizer, max_length)
        tmp = path.with_suffix(".tmp")
        save_file({f.name: getattr(encoded, f.name).contiguous() for f in fields(encoded)
                   if getattr(encoded, f.name) is not None}, tmp, metadata={"key": json.dumps(key_parts)})
        tmp.replace(path)  # atomic: a crash never leaves a half-written cache entry
    return _MEMORY.put(key, encoded)


def _flat(sequences: list[list[int]], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]))
    flat = np.fromiter((t for s in sequences for t in s), dtype=np.int64, count=int(lengths.sum()))
    return torch.from_numpy(flat).to(dtype), offsets


def _tokenize(spec: TaskSpec, raw: data.RawSplit, tokenizer, max_length: int) -> Encoded:
    if spec.kind == "mlm":
        return _tokenize_text(raw.texts, tokenizer, max_length)
    if spec.kind == "token":
        return _tokenize_words(raw.texts, raw.labels, tokenizer, max_length)
    if spec.kind == "rank":
        ids, offsets = _flat(prompts.tokenize(spec, raw.texts, tokenizer, max_length), torch.int32)
        verbalizers = prompts.verbalizer_ids(spec, tokenizer)
        choices = torch.full((len(verbalizers), max(map(len, verbalizers))), -1, dtype=torch.long)
        for row, tokens in zip(choices, verbalizers):
            row[: len(tokens)] = torch.tensor(tokens)
        return Encoded(ids, offsets, torch.tensor(raw.labels, dtype=torch.long), choices=choices)
    columns = list(zip(*raw.texts))
    batch = tokenizer(list(columns[0]), list(columns[1]) if len(columns) > 1 else None,
                      truncation=True, max_length=max_length)
    ids, offsets = _flat(batch["input_ids"], torch.int32)
    type_ids = _flat(batch["token_type_ids"], torch.int8)[0] if "token_type_ids" in batch else None
    label_dtype = torch.float32 if spec.kind == "regression" else torch.long
    return Encoded(ids, offsets, torch.tensor(raw.labels, dtype=label_dtype), type_ids)


def _tokenize_words(sentences: list[list[str]], tags: list[list[int]], tokenizer, max_length: int) -> Encoded:
    batch = tokenizer(sentences, is_split_into_words=True, truncation=True, max_length=max_length)
    token_labels = []
    for i, word_tags in enumerate(tags):
        previous, row = None, []
        for word in batch.word_ids(i):
            # Only a word's first sub-word carries its tag; the rest are ignored by loss and metric.
            row.append(word_tags[word] if word is not None and word != previous else IGNORE)
            previous = word
        token_labels.append(row)
    ids, offsets = _flat(batch["input_ids"], torch.int32)
    labels = _flat(token_labels, torch.long)[0]
    word_labels, word_offsets = _flat(tags, torch.long)
    type_ids = _flat(batch["token_type_ids"], torch.int8)[0] if "token_type_ids" in batch else None
    return Encoded(ids, offsets, labels, type_ids, word_labels, word_offsets)


def _clean_wikitext(line: str, unk: str) -> str:
    """Undo WikiText's tokenization marks so the sub-word tokenizer sees ordinary text."""
    for mark, plain in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", ".")):
        line = line.replace(mark, plain)
    return line.replace("<unk>", unk)


def _tokenize_text(lines: list[str], tokenizer, max_length: int) -> Encoded:
    unk = tokenizer.unk_token or "<unk>"
    pieces = tokenizer([_clean_wikitext(line, unk) for line in lines], add_special_tokens=False)["input_ids"]
    stream = np.fromiter((t for p in pieces for t in p), dtype=np.int64)
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    if cls is not None and sep is not None:  # BERT family: [CLS] block [SEP]
        start, end = [cls], [sep]
    else:  # a decoder's tokenizer: BOS (when it has one) then the block, as it starts any text
        start, end = ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []), []
    body = max_length - len(start) - len(end)  # room for the framing tokens
    blocks = [stream[i: i + body] for i in range(0, len(stream), body)]
    if len(blocks) > 1 and len(blocks[-1]) < body // 2:
        blocks.pop()  # a short tail block would weigh its few tokens like a whole block
    ids, offsets = _flat([[*start, *b.tolist(), *end] for b in blocks], torch.int32)
    return Encoded(ids, offsets, torch.full(ids.shape, IGNORE, dtype=torch.long))


def mlm_mask(input_ids: torch.Tensor, tokenizer, generator: torch.Generator,
             probability: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: pick `probability` of the ordinary tokens; of those 80% -> [MASK], 10% -> a random
    token, 10% unchanged. Returns (masked ids, labels with -100 where nothing is predicted).

    Special and unknown tokens are never picked (predicting [UNK] says nothing about a model).
    """
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=input_ids.dtype)
    maskable = ~torch.isin(input_ids, special)
    draws = torch.rand(input_ids.shape, generator=generator)
    picked = maskable & (draws < probability)
    action = torch.rand(input_ids.shape, generator=generator)
    random_ids = torch.randint(len(tokenizer), input_ids.shape, generator=generator, dtype=input_ids.dtype)
    masked = torch.where(picked & (action < 0.8), tokenizer.mask_token_id, input_ids)
    masked = torch.where(picked & (action >= 0.8) & (action < 0.9), random_ids, masked)
    labels = torch.where(picked, input_ids.long(), IGNORE)
    return masked, labels
