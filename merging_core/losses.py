"""Losses shared by training, evaluation, statistics, curves and ensembling.

`task_loss` is the training loss of one batch: the head's own loss, or masked-only MLM cross-entropy.

`masked_lm_logits` runs the encoder, then the vocabulary projection on the masked positions only.
A *ForMaskedLM forward projects every position (batch x length x 30k logits), which costs far more
than the encoder at small scale; predicting ~15% of the tokens is what the loss needs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .arch import adapter_for
from .encode import IGNORE
from .tasks import TaskSpec


def masked_lm_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                     encoder_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(vocabulary logits at the masked positions, their target ids). `encoder_grad=False` runs the
    encoder without autograd (head-only training: nothing below the head needs gradients)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.set_grad_enabled(encoder_grad and torch.is_grad_enabled()):
        hidden = model.base_model(**inputs).last_hidden_state
    masked = batch["labels"] != IGNORE
    head = adapter_for(model.config.model_type).mlm_head(model)
    return head(hidden[masked]).float(), batch["labels"][masked]


def task_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], spec: TaskSpec, *,
              encoder_grad: bool = True) -> torch.Tensor:
    """The training loss of one batch: the head's own loss, or masked-only MLM cross-entropy."""
    if spec.kind == "mlm":
        logits, targets = masked_lm_logits(model, batch, encoder_grad=encoder_grad)
        return F.cross_entropy(logits, targets)
    return model(**batch).loss
