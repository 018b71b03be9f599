"""Score models on a task split: loss plus the task's metrics.

An `Evaluator` tokenizes its split once, cuts it into length-sorted padded batches (little padding,
so few wasted FLOPs) and keeps them on the device, then scores any number of models with them. This
is what makes interpolation curves and merge tables cheap: K models cost K forward passes over the
data, not K tokenizations. MLM masks are drawn once from a seeded generator, so every model is scored
on the same masked tokens.

Loss is the mean cross-entropy (classification: per example; token tasks: per labelled token; MLM:
per masked token; causal LM: per predicted next token) or the mean squared error (regression). For MLM
only the masked positions go through the vocabulary projection, which saves most of the head's compute
and memory.

A text task (wikitext2) scores a masked LM on masked tokens and a causal LM (`*ForCausalLM`,
`GPT2LMHeadModel`) on the next token of every position: the mean shifted cross-entropy over the tokens
that follow a real token, padding left out, and its perplexity (`losses.causal_lm_hidden`); an
encoder-decoder (T5) by span corruption: the mean cross-entropy of its targets, on spans drawn once from
`mask_seed` (`spans`), and its perplexity. Which head
kinds score which tasks is the task registry's (`TaskSpec.heads`); any other combination is one line
naming the model, the task and the tasks its head can be scored on. A causal LM scores a classification
task by rank classification: the task's prompts, each label ranked by its verbalizer's likelihood
(`prompts`), with the metrics of a classification head.

Decoders' sequence heads read the last non-padding token: batches are right-padded with
`encode.pad_id(tokenizer)` and the scored model's `config.pad_token_id` is set to it
(`models.match_padding`), so transformers finds that token.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from . import metrics, settings, spans
from .arch import require
from .encode import IGNORE, Encoded, encode, mlm_mask, model_inputs, pad_id
from .errors import MergeLabError
from .losses import causal_lm_hidden, masked_lm_logits, rank_scores, seq2seq_lm_logits, text_noise
from .models import Loaded, ModelRef, check_head, load, match_padding, model_head, resolve
from .progress import ProgressFn, scaled, track
from .tasks import TaskSpec, get_task, scored_as

MASK_SEED = 0  # the fixed MLM masking seed: changing it changes every MLM score
LM_ROWS = 2048  # causal LM: positions per vocabulary projection (2048 x a 150k vocabulary: 1.2 GB of logits)


class _NonFinite(Exception):
    """Raised inside a scoring pass at the first NaN/inf logit; `Evaluator.__call__` explains it."""


class Evaluator:
    """Scores models on one (task, split); build once, call with many models."""

    def __init__(self, task: str | TaskSpec, tokenizer, split: str = "dev", limit: int | None = None, *,
                 batch_size: int | None = None, device: torch.device | str | None = None,
                 max_length: int = 128, mask_seed: int = MASK_SEED, indices: Sequence[int] | None = None):
        self.spec = get_task(task) if isinstance(task, str) else task
        self.split = split
        # a causal LM scores a classification task as prompts (rank classification): built on first use
        self._as_prompts = functools.partial(Evaluator, scored_as(self.spec, "causal"), tokenizer, split, limit,
                                             batch_size=batch_size, device=device, max_length=max_length,
                                             indices=indices)
        self._ranked: Evaluator | None = None
        self.device = torch.device(device) if device is not None else settings.device()
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        encoded = encode(self.spec, split, tokenizer, max_length)
        if indices is not None:  # these examples of the split, in this order (a data map's examples)
            index = torch.as_tensor(list(indices), dtype=torch.long)
            if len(index) and (int(index.min()) < 0 or int(index.max()) >= len(encoded)):
                raise MergeLabError(f"example indices must lie in 0..{len(encoded) - 1} of {self.spec.name} {split}",
                                    param="indices")
            encoded = encoded.subset(index)
        encoded = encoded.head(limit)
        self.text = encoded  # unmasked: what a causal LM is scored on, and an encoder-decoder's spans are cut from
        self.tokenizer, self.mask_seed = tokenizer, mask_seed
        # a decoder's tokenizer has no mask token: its text task is scored by a causal LM only
        self.masked = self.spec.kind == "mlm" and tokenizer.mask_token_id is not None
        if self.masked:
            masked, labels = mlm_mask(encoded.ids, tokenizer, torch.Generator().manual_seed(mask_seed))
            encoded = replace(encoded, ids=masked.to(encoded.ids.dtype), labels=labels)
        self.encoded = encoded
        self.n = len(encoded)
        # Classification/regression: the last scored model's logits, in dataset order (per-example views
        # read them, so recording which examples a model gets right costs no second forward pass).
        self.last_logits: torch.Tensor | None = None
        batch_size = batch_size or (256 if self.device.type == "cuda" else 64)
        # Longest first: the first batch shows the peak memory at once, and similar lengths share a batch.
        self.order = torch.argsort(encoded.lengths, descending=True, stable=True)
        self.pad_id = pad_id(tokenizer)
        self.batch_size = batch_size
        self.batches = self._device_batches(encoded, self.order)
        self._text_batches: list[dict[str, torch.Tensor]] | None = None  # built on first causal-LM score
        self._span_batches: list[dict[str, torch.Tensor]] | None = None  # built on first encoder-decoder score

    @torch.inference_mode()
    def __call__(self, model: torch.nn.Module, progress: ProgressFn | None = None, *, name: str | None = None) -> dict:
        """{"task", "split", "n", <metrics>..., "loss"} for `model` (already on this evaluator's device).

        A model whose logits or loss are not finite (NaN/inf weights, an overflow) fails with a
        `MergeLabError` (`name` names it) instead of getting a meaningless score."""
        config = getattr(model, "config", None)
        noise = "mask"
        if config is not None:  # families whose inputs and heads MergeLab handles (`arch.SCORED`)
            require(config.model_type, "scoring", name)
            head = model_head(model)
            if head.kind is not None and head.kind not in self.spec.heads:  # e.g. a causal LM on conll2003
                check_head(name or type(model).__name__, head, self.spec)
            noise = text_noise(model) if self.spec.kind == "mlm" else "mask"
            if scored_as(self.spec, head.kind) is not self.spec:  # rank classification, on its own prompts
                self._ranked = self._ranked or self._as_prompts()
                values = self._ranked(model, progress, name=name)
                self.last_logits = self._ranked.last_logits
                return values
            match_padding(model, self.pad_id)
        model.eval()
        # a language model's text task by its own noise (none: next tokens; spans: T5), else by task kind
        score = {None: self._causal, "spans": self._spans}.get(noise) or {
            "mlm": self._mlm, "token": self._token, "rank": self._rank}.get(self.spec.kind, self._sequence)
        who = f"model {name!r}" if name else "the model"
        try:
            values = score(model, progress)
        except _NonFinite:
            raise MergeLabError(f"{who} gives non-finite logits (NaN/inf) on {self._desc}: the checkpoint has NaN/inf "
                                "weights (or overflows), so it cannot be scored; retrain or re-export it") from None
        if not math.isfinite(values["loss"]):
            raise MergeLabError(f"{who} has a non-finite loss ({values['loss']}) on {self._desc} although its logits "
                                "are finite: its outputs overflow; check the checkpoint's weights")
        return {"task": self.spec.name, "split": self.split, "n": self.n, **values}

    def _device_batches(self, examples: Encoded | spans.Corrupted, order: torch.Tensor
                        ) -> list[dict[str, torch.Tensor]]:
        """`examples` in `order`, cut into padded batches of `batch_size` on this evaluator's device."""
        return [{k: v.to(self.device) for k, v in examples.batch(order[i: i + self.batch_size], self.pad_id).items()}
                for i in range(0, len(order), self.batch_size)]

    @staticmethod
    def _finite(logits: torch.Tensor) -> torch.Tensor:
        """`logits`, checked: a NaN would score as an arbitrary class, silently."""
        if not bool(torch.isfinite(logits).all()):
            raise _NonFinite
        return logits

    def _forward(self, model, batch) -> torch.Tensor:
        return self._finite(model(**model_inputs(batch, getattr(model, "config", None))).logits.float())

    def _sequence(self, model, progress, forward=None) -> dict:
        forward = forward or self._forward
        outputs = [forward(model, b) for b in track(self.batches, len(self.batches), self._desc, progress)]
        logits = torch.cat(outputs).cpu()[torch.argsort(self.order)]  # back to dataset order
        self.last_logits = logits
        labels = self.encoded.labels
        if self.spec.kind == "regression":
            loss = F.mse_loss(logits.squeeze(-1), labels).item()
        else:
            loss = F.cross_entropy(logits, labels).item()
        return {**metrics.sequence_metrics(self.spec, logits.numpy(), labels.numpy()), "loss": loss}

    def _rank(self, model, progress) -> dict:
        """Rank classification: each label's score is the likelihood of its verbalizer (`losses.rank_scores`);
        loss and metrics as a classification head's, on those scores."""
        return self._sequence(model, progress, lambda m, b: self._finite(rank_scores(m, b)))

    def _token(self, model, progress) -> dict:
        predicted_tags: list[list[int]] = [[] for _ in range(self.n)]
        loss_sum, count = 0.0, 0
        rows = iter(self.order.tolist())
        for batch in track(self.batches, len(self.batches), self._desc, progress):
            logits = self._forward(model, batch)
            labelled = batch["labels"] != IGNORE
            loss_sum += F.cross_entropy(logits[labelled], batch["labels"][labelled], reduction="sum").item()
            count += int(labelled.sum())
            best = logits.argmax(-1).cpu()
            for row_best, row_labelled in zip(best, labelled.cpu()):
                predicted_tags[next(rows)] = row_best[row_labelled].tolist()
        names = self.spec.labels
        gold, predicted = [], []
        for i, tags in enumerate(predicted_tags):
            words = self.encoded.word_tags(i)
            tags = tags + [0] * (len(words) - len(tags))  # words cut off by truncation count as "O"
            gold.append([names[t] for t in words])
            predicted.append([names[t] for t in tags])
        return {**metrics.select(self.spec, metrics.span_metrics(predicted, gold)), "loss": loss_sum / max(count, 1)}

    def _mlm(self, model, progress) -> dict:
        if not self.masked:
            raise MergeLabError(f"the tokenizer this evaluator was built with has no mask token, so {self._desc} "
                                "cannot be scored as masked-LM loss; use the masked LM's own tokenizer")
        loss_sum, count = 0.0, 0
        for batch in track(self.batches, len(self.batches), self._desc, progress):
            logits, targets = masked_lm_logits(model, batch)
            self._finite(logits)
            loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
            count += len(targets)
        return {**metrics.mlm_metrics(loss_sum / max(count, 1)), "masked_tokens": count}

    def _causal(self, model, progress) -> dict:
        """Mean next-token cross-entropy over every real token that follows a real token, and perplexity."""
        if self._text_batches is None:
            self._text_batches = self._device_batches(self.text, self.order)
        loss_sum, count = 0.0, 0
        for batch in track(self._text_batches, len(self._text_batches), self._desc, progress):
            hidden, targets, head = causal_lm_hidden(model, batch)
            for i in range(0, len(targets), LM_ROWS):
                logits = self._finite(head(hidden[i: i + LM_ROWS]).float())
                loss_sum += F.cross_entropy(logits, targets[i: i + LM_ROWS], reduction="sum").item()
            count += len(targets)
        return {**metrics.mlm_metrics(loss_sum / max(count, 1)), "predicted_tokens": count}

    def _spans(self, model, progress) -> dict:
        """Span corruption (`spans`): the mean cross-entropy over the targets' tokens, and perplexity."""
        if self._span_batches is None:
            corrupted = spans.corrupt_split(self.text, self.tokenizer, torch.Generator().manual_seed(self.mask_seed))
            order = torch.argsort(corrupted.inputs.lengths, descending=True, stable=True)
            self._span_batches = self._device_batches(corrupted, order)
        loss_sum, count = 0.0, 0
        for batch in track(self._span_batches, len(self._span_batches), self._desc, progress):
            logits, targets = seq2seq_lm_logits(model, batch)
            loss_sum += F.cross_entropy(self._finite(logits), targets, reduction="sum").item()
            count += len(targets)
        return {**metrics.mlm_metrics(loss_sum / max(count, 1)), "target_tokens": count}

    @property
    def _desc(self) -> str:
        return f"{self.spec.name} {self.split}"


def evaluate(model: str | ModelRef | Loaded, task: str | TaskSpec, split: str = "dev", limit: int | None = None, *,
             batch_size: int | None = None, allow_pickle: bool = False,
             progress: ProgressFn | None = None) -> dict:
    """Score one model on one task split: {"task", "split", "n", <metrics>..., "loss"}.

    `model` is a spec (zoo name, local folder, "minilm", hub id) or an already loaded model.
    """
    spec = get_task(task) if isinstance(task, str) else task
    if isinstance(model, Loaded):
        check_head(model.ref.spec, model_head(model.model), spec)
        loaded = model
    else:
        loaded = load(model, spec, allow_pickle=allow_pickle)
    device = next(loaded.model.parameters()).device
    evaluator = Evaluator(spec, loaded.tokenizer, split, limit, batch_size=batch_size, device=device)
    return evaluator(loaded.model, progress, name=loaded.ref.spec)


def headline(result: dict) -> tuple[str, float]:
    """The task's headline metric of an evaluation result, e.g. ("accuracy", 0.91)."""
    name = get_task(result["task"]).main_metric
    return name, float(result[name])


def as_row(result: dict) -> dict:
    """A flat, rounded row for tables."""
    return {k: (round(v, 4) if isinstance(v, float) and not np.isnan(v) else v) for k, v in result.items()}


def evaluate_many(model: str, tasks: list[str], split: str = "dev", limit: int | None = None, *,
                  progress: ProgressFn | None = None) -> list[dict]:
    """Score one model on several tasks. A task the model's head cannot score gives a row with an
    "error" instead of stopping the others; a model that cannot be found fails at once."""
    if not tasks:
        raise MergeLabError("no task selected; pick at least one task")
    ref = resolve(model)
    rows = []
    for i, task in enumerate(tasks):
        part = scaled(progress, i / len(tasks), (i + 1) / len(tasks), f"{task}: ")
        try:
            rows.append(evaluate(ref, task, split, limit, progress=part))
        except MergeLabError as exc:
            rows.append({"task": get_task(task).name, "split": split, "error": str(exc)})
    return rows
