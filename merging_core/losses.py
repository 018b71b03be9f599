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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .arch import adapter_for
from .encode import IGNORE, model_inputs
from .models import model_head
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


def is_causal_lm(model: torch.nn.Module) -> bool:
    """True for a causal language model (`*ForCausalLM`, `GPT2LMHeadModel`): scored on text by next-token loss."""
    return model_head(model).kind == "causal"


def causal_lm_hidden(model: torch.nn.Module, batch: dict[str, torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.nn.Module]:
    """(last hidden states at every position that predicts a real next token, those next tokens, the LM
    head). Right padding: position t predicts token t + 1 where both are unmasked."""
    hidden = model.base_model(**model_inputs(batch, model.config)).last_hidden_state
    real = batch["attention_mask"].bool()
    predicts = real[:, :-1] & real[:, 1:]
    return hidden[:, :-1][predicts], batch["input_ids"][:, 1:][predicts], model.get_output_embeddings()


def causal_lm_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(next-token logits at every predicting position, the tokens they predict), as `masked_lm_logits`."""
    hidden, targets, head = causal_lm_hidden(model, batch)
    return head(hidden).float(), targets


def language_model_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor], *, encoder_grad: bool = True
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The predictions a language model is scored on in a text task: masked tokens (a masked LM) or next
    tokens (a causal LM), with their targets. `encoder_grad`: as `masked_lm_logits` (a causal LM trains whole)."""
    if is_causal_lm(model):
        return causal_lm_logits(model, batch)
    return masked_lm_logits(model, batch, encoder_grad=encoder_grad)


def task_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], spec: TaskSpec, *,
              encoder_grad: bool = True) -> torch.Tensor:
    """The training loss of one batch: the head's own loss, masked-only MLM cross-entropy, or (a causal LM on
    a text task) the mean next-token cross-entropy of every position followed by a real token."""
    if spec.kind == "mlm":
        return F.cross_entropy(*language_model_logits(model, batch, encoder_grad=encoder_grad))
    # only the inputs the family's forward takes: GPT-2 would embed token type ids as words (`model_inputs`)
    return model(**model_inputs(batch, getattr(model, "config", None)), labels=batch["labels"]).loss
