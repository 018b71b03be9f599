"""Rank classification: a causal language model reads a classification task as text and picks a label by
likelihood, with no classification head.

Each classification task names a template and one verbalizer per label (`tasks.Prompt`). An example is
the template filled with its text columns; label c's score is the log-likelihood the model gives its
verbalizer as the continuation of that prompt, and the prediction is the best-scoring label: rank
classification, the way T0 is evaluated (Sanh et al. 2022, arXiv:2110.08207, Sec. 3) and MaTS scores its
merged T0/T5 models (Tam et al. 2023, arXiv:2312.04339). Verbalizers of several tokens score by their mean
token log-likelihood, as T-Few's length normalization (Liu et al. 2022, arXiv:2205.05638, Sec. 3.2), so
longer label words are not penalized; a one-token verbalizer's score is its plain log-likelihood.

Training uses the same scores: the cross-entropy of the softmax over the labels' scores (T-Few's L_LN,
Eq. 3), so a model's training loss and its scoring loss are one quantity (`losses.rank_scores`).

Prompts are tokenized piece by piece: the template's literal text and each text column separately, the
text columns cut (longest first) so that prompt plus the longest verbalizer fit in `max_length` and the
template's closing words (the question the verbalizer answers) are never truncated away.
"""

from __future__ import annotations

import re

import torch

from .errors import MergeLabError
from .tasks import TaskSpec

_FIELD = re.compile(r"\{(\d+)\}")


def _pieces(template: str) -> list[str | int]:
    """The template as literal strings and column indices, in order: "A {0} B" -> ["A ", 0, " B"]."""
    parts: list[str | int] = []
    for i, part in enumerate(_FIELD.split(template)):
        if i % 2:
            parts.append(int(part))
        elif part:
            parts.append(part)
    return parts


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def start_ids(tokenizer) -> list[int]:
    """The token a prompt starts with: [CLS] for a BERT-style vocabulary (as the corpus blocks a scratch decoder
    learned from: `encode`), else the tokenizer's BOS token when it has one."""
    if tokenizer.cls_token_id is not None and tokenizer.sep_token_id is not None:
        return [tokenizer.cls_token_id]
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def end_ids(tokenizer) -> list[int]:
    """The token a prompt ends with: EOS for a tokenizer with no start token at all (T5's: its encoder reads
    text closed by </s>), else none (a decoder's verbalizer follows the prompt directly)."""
    if start_ids(tokenizer) or tokenizer.eos_token_id is None:
        return []
    return [tokenizer.eos_token_id]


def verbalizer_ids(spec: TaskSpec, tokenizer) -> list[list[int]]:
    """Each label's verbalizer as token ids (a leading space, as the word follows the prompt's last word)."""
    if spec.prompt is None:
        raise MergeLabError(f"task {spec.name} has no prompt, so a language model cannot be scored on it by rank "
                            "classification; score it with a model that has its own head")
    ids = [_ids(tokenizer, " " + word) for word in spec.prompt.verbalizers]
    for word, tokens in zip(spec.prompt.verbalizers, ids):
        if not tokens:
            raise MergeLabError(f"the verbalizer {word!r} of task {spec.name} is empty under this tokenizer")
    return ids


def tokenize(spec: TaskSpec, texts: list[tuple[str, ...]], tokenizer, max_length: int) -> list[list[int]]:
    """Every example's prompt as token ids (start token, then the filled template), fitting `max_length`
    together with the longest verbalizer."""
    pieces = _pieces(spec.prompt.template)
    literal = {i: _ids(tokenizer, p) for i, p in enumerate(pieces) if isinstance(p, str)}
    start, end = start_ids(tokenizer), end_ids(tokenizer)
    room = max_length - len(start) - len(end) - max(len(v) for v in verbalizer_ids(spec, tokenizer)) \
        - sum(len(ids) for ids in literal.values())
    if room < len([p for p in pieces if isinstance(p, int)]):
        raise MergeLabError(f"max_length {max_length} leaves no room for the text of task {spec.name}'s prompt; "
                            "raise max_length")
    columns = [tokenizer(list(column), add_special_tokens=False)["input_ids"] for column in zip(*texts)]
    prompts = []
    for row in range(len(texts)):
        fields = [list(column[row]) for column in columns]
        for _ in range(sum(map(len, fields)) - room):  # longest column first, as "longest_first" truncation
            max(fields, key=len).pop()
        ids = list(start)
        for i, piece in enumerate(pieces):
            ids += literal[i] if isinstance(piece, str) else fields[piece]
        prompts.append(ids + end)
    return prompts


def candidates(prompt_ids: torch.Tensor, lengths: torch.Tensor, verbalizer: list[int]
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded prompts (batch, width) with `verbalizer` written after each one's last real token:
    (input ids, attention mask). What lies past a row's end is masked, whatever its value."""
    extra = len(verbalizer)
    ids = torch.nn.functional.pad(prompt_ids, (0, extra))
    positions = lengths[:, None] + torch.arange(extra, device=ids.device)[None, :]
    ids.scatter_(1, positions, torch.tensor(verbalizer, dtype=ids.dtype, device=ids.device).expand(len(ids), extra))
    mask = torch.arange(ids.shape[1], device=ids.device)[None, :] < (lengths + extra)[:, None]
    return ids, mask.long()
