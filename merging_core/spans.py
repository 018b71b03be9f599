"""Span corruption: the text task of an encoder-decoder (T5), its counterpart of masked-LM loss.

T5 is pretrained, and scored here on text, by span corruption (Raffel et al. 2020, arXiv:1910.10683,
Sec. 3.1.4 and 3.3.4, Table 4): 15% of a text's tokens are dropped in spans of mean length 3; the encoder
reads the text with each dropped span replaced by one sentinel token (`<extra_id_0>`, `<extra_id_1>`,
...), and the decoder predicts every dropped span behind its sentinel, closed by a final sentinel and EOS:

    text     Thank you for inviting me to your party last week .
    input    Thank you <extra_id_0> me to your party <extra_id_1> week .
    target   <extra_id_0> for inviting <extra_id_1> last <extra_id_2> </s>

The loss is the mean cross-entropy over the target's tokens, so its exponential is the perplexity of
those predictions. As T5's `random_spans_noise_mask`, an example of n tokens has round(0.15 n) noise
tokens (at least one) in round(noise / 3) spans; noise and kept tokens are each cut into that many
non-empty runs at uniformly drawn places and interleaved, kept run first. The framing tokens a block
starts or ends with ([CLS], [SEP], BOS, EOS) stay in place, and the input ends with EOS as T5's do.

The corruption of a split is drawn once from a seeded generator, example by example in split order, so
a score does not depend on batch size or device, and every model in a comparison is scored on the same
spans (as `encode.mlm_mask` fixes an MLM split's masks). Training corrupts each batch afresh.

A tokenizer needs sentinel tokens named `<extra_id_N>` (T5's have 100; `scratch-t5` adds them to
MiniLM's vocabulary); one with fewer sentinels than an example needs spans gets fewer, longer spans.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import torch

from .encode import IGNORE, Encoded, _flat
from .errors import MergeLabError

NOISE_DENSITY = 0.15
MEAN_SPAN = 3.0
SENTINELS = 100  # as T5's tokenizers: `<extra_id_0>` ... `<extra_id_99>`


def sentinel_names(count: int = SENTINELS) -> list[str]:
    """The sentinel tokens' names, in T5's spelling."""
    return [f"<extra_id_{i}>" for i in range(count)]


def sentinel_ids(tokenizer) -> list[int]:
    """The ids of the tokenizer's `<extra_id_0>`, `<extra_id_1>`, ... in order, as far as they go; one line
    when it has fewer than two (one span and the closing sentinel)."""
    found = []
    for token in tokenizer.convert_tokens_to_ids(sentinel_names()):  # an unknown name gives None or [UNK]'s id
        if token is None or token == tokenizer.unk_token_id:
            break
        found.append(token)
    if len(found) < 2:
        raise MergeLabError("the tokenizer has no <extra_id_0>, <extra_id_1>, ... sentinel tokens, which span "
                            "corruption (an encoder-decoder's text task) needs; use the model's own T5 tokenizer")
    return found


def _framing(tokenizer) -> tuple[set[int], set[int], int]:
    """(ids a block may start with, ids it may end with, the EOS closing inputs and targets)."""
    starts = {t for t in (tokenizer.cls_token_id, tokenizer.bos_token_id) if t is not None}
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if eos is None:
        raise MergeLabError("the tokenizer has no EOS (or [SEP]) token to close span-corruption inputs and targets")
    ends = {t for t in (tokenizer.sep_token_id, tokenizer.eos_token_id) if t is not None}
    return starts, ends, eos


def _segments(items: int, parts: int, generator: torch.Generator) -> list[int]:
    """`items` cut into `parts` non-empty runs at uniformly drawn places (all in the first run when there
    are fewer items than parts, which only a text too short to corrupt gives)."""
    if items < parts:
        return [items] + [0] * (parts - 1)
    cuts = (torch.randperm(items - 1, generator=generator)[: parts - 1] + 1).sort().values.tolist()
    bounds = [0, *cuts, items]
    return [b - a for a, b in pairwise(bounds)]


def corrupt(ids: list[int], sentinels: list[int], framing: tuple[set[int], set[int], int],
            generator: torch.Generator) -> tuple[list[int], list[int]]:
    """(encoder input, decoder target) of one example's token ids (see the module doc)."""
    starts, ends, eos = framing
    head = 1 if ids and ids[0] in starts else 0
    tail = 1 if len(ids) > head and ids[-1] in ends else 0
    body = ids[head: len(ids) - tail]
    closing = ids[len(ids) - tail:] or [eos]
    if not body:
        return ids[:head] + closing, [sentinels[0], eos]
    noise = min(max(round(len(body) * NOISE_DENSITY), 1), len(body))
    spans = max(1, min(round(noise / MEAN_SPAN), noise, len(sentinels) - 1))
    noise_runs = _segments(noise, spans, generator)
    kept_runs = _segments(len(body) - noise, spans, generator)
    source, target, at = ids[:head], [], 0
    for i, (kept, dropped) in enumerate(zip(kept_runs, noise_runs)):
        source += body[at: at + kept] + [sentinels[i]]
        target += [sentinels[i]] + body[at + kept: at + kept + dropped]
        at += kept + dropped
    return source + closing, target + [sentinels[spans], eos]


@dataclass
class Corrupted:
    """A text split after span corruption: encoder inputs and decoder targets, example by example."""

    inputs: Encoded
    targets: Encoded

    def __len__(self) -> int:
        return len(self.inputs)

    def batch(self, index: torch.Tensor, pad_id: int) -> dict[str, torch.Tensor]:
        """Examples `index`, right-padded: `input_ids` / `attention_mask` for the encoder, `labels` the
        targets padded with IGNORE (the decoder's inputs are the labels shifted right, as transformers'
        seq2seq models build them)."""
        batch = self.inputs.batch(index, pad_id)
        batch["labels"] = self.targets.batch(index, pad_id)["labels"]
        return batch


def corrupt_split(encoded: Encoded, tokenizer, generator: torch.Generator) -> Corrupted:
    """Every example of a text split corrupted in order with `generator` (see the module doc)."""
    sentinels, framing = sentinel_ids(tokenizer), _framing(tokenizer)
    ids, offsets = encoded.ids.tolist(), encoded.offsets.tolist()  # once, not a tensor slice per example
    sources, targets = [], []
    for start, end in pairwise(offsets):
        source, target = corrupt(ids[start:end], sentinels, framing, generator)
        sources.append(source)
        targets.append(target)
    return Corrupted(_as_encoded(sources, with_labels=False), _as_encoded(targets, with_labels=True))


def corrupt_batch(batch: dict[str, torch.Tensor], tokenizer, generator: torch.Generator, pad_id: int
                  ) -> dict[str, torch.Tensor]:
    """A right-padded batch of text blocks corrupted afresh (training): the batch `Corrupted.batch` gives."""
    lengths = batch["attention_mask"].sum(1).tolist()
    rows = Encoded(batch["input_ids"][batch["attention_mask"].bool()],
                   torch.tensor([0, *lengths]).cumsum(0), torch.zeros(0, dtype=torch.long))
    return corrupt_split(rows, tokenizer, generator).batch(torch.arange(len(lengths)), pad_id)


def _as_encoded(sequences: list[list[int]], *, with_labels: bool) -> Encoded:
    ids, offsets = _flat(sequences, torch.long)
    # token-level labels (the targets themselves) make `Encoded.batch` pad them with IGNORE
    labels = ids.clone() if with_labels else torch.full(ids.shape, IGNORE, dtype=torch.long)
    return Encoded(ids.to(torch.int32), offsets, labels)
