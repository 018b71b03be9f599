"""Losses shared by training, evaluation, statistics, curves and ensembling.

`task_loss` is the training loss of one batch: the head's own loss, masked-only MLM cross-entropy, or on a
causal LM the shifted next-token cross-entropy below.

`masked_lm_logits` runs the encoder, then the vocabulary projection on the masked positions only.
A *ForMaskedLM forward projects every position (batch x length x 30k logits), which costs far more
than the encoder at small scale; predicting ~15% of the tokens is what the loss needs.

`causal_lm_hidden` / `causal_lm_logits` are the causal-LM counterpart on a text task: the next-token
prediction of every position whose next token is real (not padding), i.e. the standard shifted
cross-entropy (labels = inputs shifted left by one, padding ignored), as transformers' `*ForCausalLM` loss
computes it (Radford et al. 2019, GPT-2, Sec. 2: p(x) = Π p(x_t | x_<t)). The vocabulary projection runs
on those positions only, so callers can cut them into chunks (vocabularies of 150k tokens).

`seq2seq_lm_logits` is an encoder-decoder's (T5's) text-task prediction: the decoder's logits at every
target token of a span-corrupted batch (`spans`), teacher-forced on the targets shifted right.

`rank_scores` scores a classification task's labels by a causal LM's likelihood of each label's verbalizer
after the prompt (rank classification, `prompts`); its training loss is the cross-entropy of those scores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .arch import adapter_for
from .encode import IGNORE, model_inputs
from .models import model_head
from .prompts import candidates
from .tasks import TaskSpec


def masked_lm_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                     encoder_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(vocabulary logits at the masked positions, their target ids). `encoder_grad=False` runs the
    encoder without autograd (head-only training: nothing below the head needs gradients)."""
    inputs = model_inputs(batch, model.config)
    with torch.set_grad_enabled(encoder_grad and torch.is_grad_enabled()):
        hidden = model.base_model(**inputs).last_hidden_state
    masked = batch["labels"] != IGNORE
    head = adapter_for(model.config.model_type).mlm_head(model)
    return head(hidden[masked]).float(), batch["labels"][masked]


def text_noise(model: torch.nn.Module) -> str | None:
    """How a text task's blocks are corrupted for this model: "mask" (a masked LM: BERT masking), "spans"
    (an encoder-decoder: span corruption, `spans`) or None (a causal LM reads its text whole)."""
    kind = model_head(model).kind
    return {"causal": None, "seq2seq": "spans"}.get(kind, "mask")


def seq2seq_lm_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(vocabulary logits at every target token, those tokens) of an encoder-decoder on a span-corrupted batch:
    the decoder reads the targets shifted right behind its start token, as transformers' seq2seq loss."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    labels = batch["labels"]
    decoder_ids = inner.prepare_decoder_input_ids_from_labels(labels=labels)
    inputs = model_inputs(batch, model.config)
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                   decoder_input_ids=decoder_ids).logits
    real = labels != IGNORE
    return logits[real].float(), labels[real]


def causal_lm_hidden(model: torch.nn.Module, batch: dict[str, torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.nn.Module]:
    """(last hidden states at every position that predicts a real next token, those next tokens, the LM
    head). Right padding: position t predicts token t + 1 where both are unmasked."""
    hidden = decoder_stack(model)(**model_inputs(batch, model.config)).last_hidden_state
    real = batch["attention_mask"].bool()
    predicts = real[:, :-1] & real[:, 1:]
    return hidden[:, :-1][predicts], batch["input_ids"][:, 1:][predicts], model.get_output_embeddings()


def causal_lm_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(next-token logits at every predicting position, the tokens they predict), as `masked_lm_logits`."""
    hidden, targets, head = causal_lm_hidden(model, batch)
    return head(hidden).float(), targets


def decoder_stack(model: torch.nn.Module) -> torch.nn.Module:
    """The transformer under a causal LM's head (`LlamaModel` under `LlamaForCausalLM`), also through a PEFT
    wrapper, whose adapter layers sit inside it: hidden states without projecting every position."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.base_model


def rank_scores(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(batch, labels) rank-classification scores of a causal LM or an encoder-decoder on prompts
    (`batch["choices"]`: each label's verbalizer ids, -1 padded): the log-likelihood of a one-token verbalizer after the prompt, the mean
    token log-likelihood of a longer one (`prompts`). One forward pass scores every one-token verbalizer at
    once; each longer one takes a pass of its own over prompt + verbalizer. A wrapper of several models (an
    output ensemble) scores by its own `rank_scores`."""
    if hasattr(model, "rank_scores"):
        return model.rank_scores(batch)
    if getattr(model.config, "is_encoder_decoder", False):
        return _seq2seq_rank_scores(model, batch)
    stack, head = decoder_stack(model), model.get_output_embeddings()
    lengths = batch["attention_mask"].sum(1)
    rows = torch.arange(len(lengths), device=lengths.device)
    verbalizers = [row[row >= 0] for row in batch["choices"]]
    scores: list[torch.Tensor | None] = [None] * len(verbalizers)
    single = [c for c, v in enumerate(verbalizers) if len(v) == 1]
    if single:
        hidden = stack(**model_inputs(batch, model.config)).last_hidden_state[rows, lengths - 1]
        log_probs = F.log_softmax(head(hidden).float(), -1)
        for c in single:
            scores[c] = log_probs[:, verbalizers[c][0]]
    for c, tokens in enumerate(verbalizers):
        if len(tokens) > 1:
            ids, mask = candidates(batch["input_ids"], lengths, tokens.tolist())
            hidden = stack(input_ids=ids, attention_mask=mask).last_hidden_state
            # the positions that predict each verbalizer token: the prompt's last token onwards
            at = lengths[:, None] - 1 + torch.arange(len(tokens), device=ids.device)[None, :]
            log_probs = F.log_softmax(head(hidden[rows[:, None], at]).float(), -1)
            scores[c] = log_probs.gather(-1, tokens.expand(len(rows), -1)[..., None]).squeeze(-1).mean(1)
    return torch.stack(scores, 1)


def _seq2seq_rank_scores(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """`rank_scores` of an encoder-decoder (T5): the encoder reads the prompt once, and the decoder, started
    from its start token, scores each verbalizer as the target (teacher-forced), as T0 ranks its answers
    (Sanh et al. 2022, arXiv:2110.08207); one decoder pass scores every one-token verbalizer at once."""
    inputs = model_inputs(batch, model.config)
    encoded = model.get_encoder()(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    rows = len(batch["input_ids"])
    start = torch.full((rows, 1), model.config.decoder_start_token_id, device=batch["input_ids"].device)
    verbalizers = [row[row >= 0] for row in batch["choices"]]
    scores: list[torch.Tensor | None] = [None] * len(verbalizers)
    groups = [[c for c, v in enumerate(verbalizers) if len(v) == 1]] + [[c] for c, v in enumerate(verbalizers)
                                                                         if len(v) > 1]
    for group in (g for g in groups if g):
        tokens = verbalizers[group[0]]
        decoder_ids = torch.cat([start, tokens[:-1].expand(rows, -1)], 1)
        logits = model(encoder_outputs=encoded, attention_mask=inputs["attention_mask"],
                       decoder_input_ids=decoder_ids).logits
        log_probs = F.log_softmax(logits.float(), -1)
        for c in group:
            target = verbalizers[c].expand(rows, -1)
            scores[c] = log_probs[:, : target.shape[1]].gather(-1, target[..., None]).squeeze(-1).mean(1)
    return torch.stack(scores, 1)


def language_model_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor], *, encoder_grad: bool = True
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The predictions a language model is scored on in a text task: masked tokens (a masked LM), next
    tokens (a causal LM) or dropped spans (an encoder-decoder), with their targets. `encoder_grad`: as
    `masked_lm_logits` (a causal LM or an encoder-decoder trains whole)."""
    noise = text_noise(model)
    if noise is None:
        return causal_lm_logits(model, batch)
    if noise == "spans":
        return seq2seq_lm_logits(model, batch)
    return masked_lm_logits(model, batch, encoder_grad=encoder_grad)


def task_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], spec: TaskSpec, *,
              encoder_grad: bool = True) -> torch.Tensor:
    """The training loss of one batch: the head's own loss, masked-only MLM cross-entropy, (a causal LM on
    a text task) the mean next-token cross-entropy of every position followed by a real token, (an
    encoder-decoder on a text task) the mean cross-entropy of its span-corruption targets, or (a language
    model on prompts) the rank-classification loss."""
    if spec.kind == "mlm":
        return F.cross_entropy(*language_model_logits(model, batch, encoder_grad=encoder_grad))
    if spec.kind == "rank":  # the softmax over the labels' scores (T-Few's L_LN, arXiv:2205.05638, Eq. 3)
        return F.cross_entropy(rank_scores(model, batch), batch["labels"])
    # only the inputs the family's forward takes: GPT-2 would embed token type ids as words (`model_inputs`)
    return model(**model_inputs(batch, getattr(model, "config", None)), labels=batch["labels"]).loss
