"""Fine-tune one checkpoint on one task: the models of the zoo.

Full fine-tuning, LoRA (via `peft`), or head-only training (the encoder frozen; this is how the MLM
head of the packaged MiniLM, which ships without one, is trained). AdamW with linear warm-up and
decay, gradient clipping at 1.0, batches of similar lengths (less padding, same examples per epoch).
MLM batches are masked on the fly from a generator seeded by the run's seed.

Every run records its provenance in `mergelab.json`: base, task, seed, steps, partition, training
settings, the dev scores of the final model and of every intermediate checkpoint (`--save-every`).
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import __version__, partition, settings
from .arch import adapter_for
from .encode import Encoded, encode, mlm_mask
from .errors import MergeLabError
from .evaluation import Evaluator
from .losses import masked_lm_logits
from .models import check_out, load, staging, write_into
from .progress import ProgressFn
from .tasks import TaskSpec, get_task


@dataclass
class TrainConfig:
    task: str
    base: str = "minilm"
    seed: int = 0
    steps: int = 300  # optimizer steps
    batch_size: int = 32
    lr: float | None = None  # None: 1e-4 full fine-tuning, 5e-4 LoRA, 1e-3 head-only
    weight_decay: float = 0.01
    warmup: float = 0.06  # fraction of steps with linearly rising learning rate
    max_length: int = 128
    partition: str = "iid"
    save_every: int | None = None  # also keep a checkpoint every N steps
    peft: str | None = None  # "lora"
    lora_r: int = 8
    lora_alpha: int = 16
    head_only: bool = False
    eval_limit: int | None = None  # score on the first N dev examples only (None: the whole split)

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return 1e-3 if self.head_only else 5e-4 if self.peft else 1e-4


@dataclass
class TrainResult:
    out: Path
    metadata: dict


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _length_grouped_batches(lengths: torch.Tensor, batch_size: int, generator: torch.Generator):
    """An endless stream of batches: shuffle, sort within windows of 50 batches, shuffle the batches."""
    window = batch_size * 50
    while True:
        order = torch.randperm(len(lengths), generator=generator)
        batches = []
        for start in range(0, len(order), window):
            chunk = order[start: start + window]
            chunk = chunk[torch.argsort(lengths[chunk], descending=True)]
            batches += [chunk[i: i + batch_size] for i in range(0, len(chunk), batch_size)]
        for i in torch.randperm(len(batches), generator=generator).tolist():
            yield batches[i]


def _trainable(model: torch.nn.Module, config: TrainConfig) -> list[torch.nn.Parameter]:
    if config.head_only:
        adapter = adapter_for(model.config.model_type)
        # named_parameters() lists a tied parameter once, under its first (encoder) name, so the MLM
        # decoder tied to the word embeddings stays frozen with them.
        for name, param in model.named_parameters():
            param.requires_grad = adapter.describe(name).group in ("head", "mlm_head")
    return [p for p in model.parameters() if p.requires_grad]


def _wrap_lora(model: torch.nn.Module, spec: TaskSpec, config: TrainConfig) -> torch.nn.Module:
    from peft import LoraConfig, TaskType, get_peft_model

    if spec.kind == "mlm":
        raise MergeLabError("--peft lora is for tasks with a classification head; train MLM heads with --head-only")
    task_type = TaskType.TOKEN_CLS if spec.kind == "token" else TaskType.SEQ_CLS
    lora = LoraConfig(task_type=task_type, r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.1,
                      target_modules=["query", "value"])
    return get_peft_model(model, lora)  # the task type keeps the classifier trainable and saved


def train(config: TrainConfig, out: str | Path, *, overwrite: bool = False,
          progress: ProgressFn | None = None) -> TrainResult:
    """Fine-tune `config.base` on `config.task` and save it (plus intermediate checkpoints) to `out`."""
    spec = get_task(config.task)
    if config.steps < 1:
        raise MergeLabError(f"--steps must be at least 1, got {config.steps}")
    if config.peft not in (None, "lora"):
        raise MergeLabError(f"--peft {config.peft!r} is not supported; use --peft lora")
    check_out(out, overwrite)  # fail before spending minutes on training
    part = partition.parse(config.partition)
    _seed_everything(config.seed)
    device = settings.device()
    loaded = load(config.base, spec, new_head=True, device=device)
    model, tokenizer = loaded.model, loaded.tokenizer
    if config.peft:
        model = _wrap_lora(model, spec, config)

    train_data = encode(spec, "train", tokenizer, config.max_length)
    if part.shards > 1:
        train_data = train_data.subset(partition.indices(part, spec, train_data.labels))
    dev = Evaluator(spec, tokenizer, "dev", config.eval_limit, device=device, max_length=config.max_length)

    params = _trainable(model, config)
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    warmup = max(1, int(config.warmup * config.steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (config.steps - step) / (config.steps - warmup + 1e-9))))
    generator = torch.Generator().manual_seed(config.seed)
    batches = _length_grouped_batches(train_data.lengths, config.batch_size, generator)

    base_meta = {
        "mergelab": __version__, "kind": "lora" if config.peft else "full", "base": loaded.ref.spec,
        "base_location": loaded.ref.location, "task": spec.name, "seed": config.seed,
        "partition": str(part), "train_examples": len(train_data), "train": asdict(config),
        "learning_rate": config.learning_rate, "head": spec.head, "labels": list(spec.labels),
    }
    checkpoints: list[dict] = []
    started = time.perf_counter()
    losses: list[float] = []
    with staging(out, overwrite=overwrite) as tmp:
        model.train()
        bar = _Bar(config.steps, f"train {spec.name}", progress)
        for step in range(1, config.steps + 1):
            batch = _next_batch(train_data, next(batches), tokenizer, generator, spec, device)
            if spec.kind == "mlm":
                logits, targets = masked_lm_logits(model, batch, encoder_grad=not config.head_only)
                loss = F.cross_entropy(logits, targets)
            else:
                loss = model(**batch).loss
            if not torch.isfinite(loss):
                raise MergeLabError(f"training diverged at step {step} (loss {loss.item()}); lower --lr")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.update(step, losses)
            if config.save_every and step % config.save_every == 0 and step < config.steps:
                entry = _checkpoint(model, tokenizer, tmp / f"step-{step}", dev, base_meta, step, started, losses)
                checkpoints.append({"step": step, "path": f"step-{step}", "dev": entry["scores"]["dev"]})
                model.train()
        bar.close()
        extra = {"checkpoints": checkpoints} if checkpoints else {}
        metadata = _checkpoint(model, tokenizer, tmp, dev, {**base_meta, **extra}, config.steps, started, losses)
    return TrainResult(Path(out), metadata)


def _next_batch(data: Encoded, index: torch.Tensor, tokenizer, generator, spec: TaskSpec, device) -> dict:
    batch = data.batch(index, tokenizer.pad_token_id or 0)
    if spec.kind == "mlm":
        batch["input_ids"], batch["labels"] = mlm_mask(batch["input_ids"], tokenizer, generator)
        batch["labels"] = torch.where(batch["attention_mask"].bool(), batch["labels"], -100)
    return {k: v.to(device) for k, v in batch.items()}


def _checkpoint(model, tokenizer, folder: Path, dev: Evaluator, base_meta: dict, step: int, started: float,
                losses: list[float]) -> dict:
    scores = dev(model)
    metadata = {**base_meta, "steps": step, "train_loss": float(np.mean(losses[-50:])),
                "train_seconds": round(time.perf_counter() - started, 1), "scores": {"dev": scores},
                "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_into(folder, model, tokenizer, metadata)
    return metadata


class _Bar:
    """Training progress: a tqdm bar with the running loss, or the app's callback."""

    def __init__(self, total: int, desc: str, progress: ProgressFn | None):
        from tqdm.auto import tqdm

        self.total, self.desc, self.progress = total, desc, progress
        self.tqdm = tqdm(total=total, desc=desc, disable=None, leave=False) if progress is None else None

    def update(self, step: int, losses: list[float]) -> None:
        recent = float(np.mean(losses[-20:]))
        if self.tqdm is not None:
            self.tqdm.update(1)
            self.tqdm.set_postfix(loss=f"{recent:.3f}", refresh=False)
        elif step % 5 == 0 or step == self.total:
            self.progress(step / self.total, f"{self.desc}: step {step}/{self.total}, loss {recent:.3f}")

    def close(self) -> None:
        if self.tqdm is not None:
            self.tqdm.close()
