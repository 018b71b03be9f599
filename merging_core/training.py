"""Fine-tune one checkpoint on one task: the models of the zoo.

Full fine-tuning, parameter-efficient modules (LoRA or (IA)³, via `peft`; bottleneck adapters, `bottleneck`), or head-only training (the encoder frozen; this is how the MLM
head of the packaged MiniLM, which ships without one, is trained). AdamW with linear warm-up and
decay, gradient clipping at 1.0, batches of similar lengths (less padding, same examples per epoch).
MLM batches are masked on the fly from a generator seeded by the run's seed.

**Families.** The BERT family trains everything above. GPT-2 (Radford et al. 2019) and the Llama layout
(Touvron et al. 2023, arXiv:2302.13971: llama, mistral, qwen2, qwen3, gemma) train sequence and token
classifiers (full, LoRA, (IA)³; `arch.decoders`) and causal LMs: on a text task (`corpus`, `wikitext2`)
these families, which have no masked-LM class, get a causal-LM head (`models.training_head`) and learn by
next-token prediction over blocks of `max_length` tokens (Radford et al. 2019, Sec. 2: the shifted
cross-entropy, `losses.task_loss`). A decoder's sequence head reads the last real token of right-padded
batches: the loaded model's `config.pad_token_id` is the padding id (`models.match_padding`), so the saved
config records it and transformers' own `from_pretrained` reads the checkpoint the same way.
`scratch-llama:<size>` is a Llama-layout decoder from a random initialization (`scratch`), pretrained this
way, then fine-tuned like any other decoder. T5 (Raffel et al. 2020, arXiv:1910.10683) trains as a
language model: on a text task by span corruption (`spans`), on a classification task by rank
classification of its prompts (full, LoRA, (IA)³ with PEFT's T5 targets); `scratch-t5:<size>` is a T5
pretrained this way. Prefix modules and bottleneck adapters stay BERT-only (they are inserted into BERT's
module layout).

Every run records its provenance in `mergelab.json`: base, task, seed, steps, partition, training
settings, the dev scores of the final model and of every intermediate checkpoint (`--save-every`).
With `cartography=N` a single-task run also records a data map of its first N training examples
(`cartography.json` beside the checkpoint; Swayamdipta et al. 2020, arXiv:2009.10795, see `cartography`).

**Multi-task training** (`task="sst2,cola,mrpc"`, or a list): the comparator of merges, a model trained
on the union of the tasks' data (RegMean, Jin et al. 2023). One encoder is shared by one head model per
task (each built as for single-task training, then given the shared encoder module); every step draws
one task and takes one batch of it, then updates encoder and heads with the same optimizer, schedule
and clipping as single-task full fine-tuning. Which task a step takes is drawn up front from the run's
seed (`sampling`): `proportional` to the size of each task's train set (default: batches come as from
the shuffled union of the data, so small tasks get few steps), `sqrt` (proportional to the square root
of the sizes, a milder balance), or `round-robin` (the tasks in turn, equal steps). The result is a
multi-head checkpoint (`models.write_multihead`): the encoder plus `heads/<task>.safetensors`, with the
dev scores of every task in `mergelab.json` as `scores: {"dev": {task: {...}}}`.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from . import bottleneck, cartography, partition, settings, spans
from ._version import __version__
from .arch import BERT, adapter_for, require
from .encode import Encoded, encode, mlm_mask, pad_id
from .errors import MergeLabError, writing
from .evaluation import Evaluator
from .losses import task_loss, text_noise
from .models import load, model_head, prefix_model, read_config, resolve, write_into, write_multihead
from .outputs import check_out, staging
from .progress import ProgressFn, with_eta
from .tasks import LANGUAGE_MODELS, TaskSpec, get_task, scored_as


SAMPLING = ("proportional", "sqrt", "round-robin")
PEFT_KINDS = ("lora", "ia3", "prefix")
# Every module kind `train` takes: PEFT's, and MergeLab's own bottleneck adapters (Houlsby et al. 2019).
MODULE_KINDS = (*PEFT_KINDS, bottleneck.KIND)
IA3_TARGETS = r".*(attention\.self\.(key|value)|layer\.\d+\.output\.dense)$"
IA3_FEEDFORWARD = r".*layer\.\d+\.output\.dense$"


@dataclass
class TrainConfig:
    task: str | Sequence[str]  # one task, or several ("sst2,cola" or a list): a multi-task model
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
    peft: str | None = None  # "lora" | "ia3" (parameter-efficient modules; see PEFT_KINDS)
    lora_r: int = 8
    lora_alpha: int = 16
    prefix_tokens: int = 20  # prefix modules: virtual tokens P (keys and values prepended in every layer)
    prefix_projection: bool = False  # prefix modules: train the prefix through an MLP (Li & Liang 2021, Sec. 4.3)
    bottleneck_size: int = 64  # bottleneck modules: units m of each adapter (Houlsby et al. 2019, Sec. 2.1)
    head_only: bool = False
    # a causal LM learns a classification task from its prompt, keeping its LM head (rank classification);
    # False gives it a fresh classification head instead
    prompt: bool = True
    eval_limit: int | None = None  # score on the first N dev examples only (None: the whole split)
    sampling: str = "proportional"  # multi-task: which task each step takes (see SAMPLING)
    cartography: int | None = None  # record a data map of the first N training examples (see `cartography`)
    cartography_every: int | None = None  # steps between data-map records (default: an epoch, or 1/8 of the run)

    def __post_init__(self) -> None:
        # A NaN or inf learning rate turns every weight into NaN; 0 or less trains nothing (or backwards).
        if self.lr is not None:
            try:
                if isinstance(self.lr, bool):
                    raise TypeError
                lr = float(self.lr)  # also a numeric string (YAML 1.1 reads 1e-4 as text)
            except (TypeError, ValueError):
                raise MergeLabError(f"learning rate must be a number, got {self.lr!r}", param="lr") from None
            if not math.isfinite(lr) or lr <= 0:
                raise MergeLabError(f"learning rate must be a finite number above 0, got {lr}", param="lr")
            self.lr = lr

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return 1e-3 if self.head_only else {"lora": 5e-4, "ia3": 3e-3, "prefix": 1e-2,
                                                 bottleneck.KIND: 1e-3}.get(self.peft, 1e-4)

    @property
    def task_specs(self) -> tuple[TaskSpec, ...]:
        """The task(s) to train on, looked up in the registry (unknown or repeated names fail clearly)."""
        names = self.task.split(",") if isinstance(self.task, str) else list(self.task)
        names = [str(n).strip() for n in names if str(n).strip()]
        if not names:
            raise MergeLabError("no task given; pass a task name or a comma-separated list of tasks")
        specs = tuple(get_task(n) for n in names)
        repeated = sorted({s.name for s in specs if sum(t.name == s.name for t in specs) > 1})
        if repeated:
            raise MergeLabError(f"task list {','.join(names)!r} names {', '.join(repeated)} more than once")
        return specs


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
        # decoder (or a causal LM's head) tied to the word embeddings stays frozen with them.
        for name, param in model.named_parameters():
            param.requires_grad = adapter.describe(name).group in ("head", "mlm_head", "lm_head")
    return [p for p in model.parameters() if p.requires_grad]


def wrap_peft(model: torch.nn.Module, spec: TaskSpec, config: TrainConfig) -> torch.nn.Module:
    """LoRA on the attention query and value (Hu et al. 2022), (IA)³ scaling keys, values and the
    feed-forward activations (Liu et al. 2022), or a prefix of `prefix_tokens` trained keys and values in
    every layer (Li & Liang 2021, arXiv:2101.00190; see `models.prefix_model`); the task type keeps the
    classifier trainable and saved. Bottleneck adapters (Houlsby et al. 2019, arXiv:1902.00751) are
    MergeLab's own module kind, inserted by `bottleneck.insert` (adapters, layer norms and head trained).

    Other families than BERT's take PEFT's own target modules for their model type (`peft_targets`: the
    fused `c_attn` of GPT-2, `q_proj` / `v_proj` of the Llama layout); prefixes and bottleneck adapters
    are inserted into BERT's module layout only."""
    from peft import IA3Config, LoraConfig, TaskType, get_peft_model

    if spec.kind == "mlm":
        raise MergeLabError(f"{config.peft} modules are for tasks with a classification head; train an MLM head "
                            "alone instead (head only)", param="peft")
    model_type = model.config.model_type
    if config.peft in ("prefix", bottleneck.KIND) and adapter_for(model_type) is not BERT:
        raise MergeLabError(f"{config.peft} modules are trained on BERT-family models only so far, not on model "
                            f"type {model_type!r}; train LoRA or (IA)³ modules, or fine-tune the whole model",
                            param="peft")
    if config.peft == bottleneck.KIND:
        return bottleneck.insert(model, bottleneck.BottleneckConfig(size=config.bottleneck_size))
    # a causal LM on prompts keeps its (tied) LM head: nothing of a classifier to train and save
    task_type = {"token": TaskType.TOKEN_CLS, "rank": TaskType.CAUSAL_LM}.get(spec.kind, TaskType.SEQ_CLS)
    if spec.kind == "rank" and model.config.is_encoder_decoder:  # T5's decoder scores the verbalizers
        task_type = TaskType.SEQ_2_SEQ_LM
    # GPT-2's layers are `Conv1D`s, whose weights are stored (in, out): PEFT must know to transpose its update
    stored_in_out = any(type(m).__name__ == "Conv1D" for m in model.modules())
    if config.peft == "lora":
        adapter = LoraConfig(task_type=task_type, r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.1,
                             target_modules=peft_targets(model_type, "lora")[0], fan_in_fan_out=stored_in_out)
    elif config.peft == "prefix":
        from peft import PrefixTuningConfig

        if not 1 <= config.prefix_tokens <= 512:
            raise MergeLabError(f"prefix tokens must be from 1 to 512, got {config.prefix_tokens}",
                                param="prefix_tokens")
        return prefix_model(model, PrefixTuningConfig(task_type=task_type, num_virtual_tokens=config.prefix_tokens,
                                                      prefix_projection=config.prefix_projection))
    else:
        targets, feedforward = peft_targets(model_type, "ia3")
        adapter = IA3Config(task_type=task_type, target_modules=targets, feedforward_modules=feedforward,
                            fan_in_fan_out=stored_in_out)
    return get_peft_model(model, adapter)


def peft_targets(model_type: str, kind: str) -> tuple[list[str] | str, list[str] | str | None]:
    """(target modules, feed-forward modules) of a LoRA or (IA)³ module on a model of `model_type`.

    The BERT family keeps MergeLab's choice: LoRA on `query` / `value`; (IA)³ as regexes, because PEFT's
    default `output.dense` also matches the attention's output layer. Other families take PEFT's defaults
    for their model type (GPT-2: LoRA on `c_attn`, (IA)³ on `c_attn` and `mlp.c_proj`; Llama: LoRA on
    `q_proj` / `v_proj`, (IA)³ on `k_proj`, `v_proj` and `down_proj`)."""
    from peft.utils import constants as defaults

    if adapter_for(model_type, generic=True) is BERT:
        return (["query", "value"], None) if kind == "lora" else (IA3_TARGETS, IA3_FEEDFORWARD)
    if kind == "lora":
        targets, feedforward = defaults.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type), None
    else:
        targets = defaults.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING.get(model_type)
        feedforward = defaults.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(model_type)
    if not targets:
        raise MergeLabError(f"PEFT has no default {kind} target modules for model type {model_type!r}; fine-tune "
                            "the whole model instead", param="peft")
    return list(targets), list(feedforward) if feedforward else None


def train(config: TrainConfig, out: str | Path, *, overwrite: bool = False,
          progress: ProgressFn | None = None, recipe: str | None = None) -> TrainResult:
    """Fine-tune `config.base` on `config.task` and save it (plus intermediate checkpoints) to `out`.

    Several tasks train one multi-task model, saved as a multi-head checkpoint (see the module doc).
    `recipe`: the zoo recipe the run belongs to, recorded in `mergelab.json` (e.g. "demo").
    """
    specs = config.task_specs
    if config.steps < 1:
        raise MergeLabError(f"steps must be at least 1, got {config.steps}", param="steps")
    if config.peft not in (None, *MODULE_KINDS):
        raise MergeLabError(f"{config.peft!r} is not a supported module kind; use one of: {', '.join(MODULE_KINDS)}",
                            param="peft")
    if config.sampling not in SAMPLING:
        raise MergeLabError(f"sampling {config.sampling!r} is not known; use one of: {', '.join(SAMPLING)}",
                            param="sampling")
    # the family's gate before any weights are read: one line for an unknown family
    base_config = read_config(resolve(config.base))
    require(base_config.model_type, "training", config.base)
    if base_config.get("is_encoder_decoder"):
        _check_language_model_tasks(config, specs, base_config.model_type)
    if len(specs) > 1:
        if config.cartography:
            raise MergeLabError("data maps are recorded for one task at a time; drop cartography or train one task",
                                param="cartography")
        return _train_multitask(config, specs, out, overwrite=overwrite, progress=progress, recipe=recipe)
    spec = specs[0]
    check_out(out, overwrite)  # fail before spending minutes on training
    part = partition.parse(config.partition)
    _seed_everything(config.seed)
    device = settings.device()
    loaded = load(config.base, spec, new_head=True, device=device, keep_lm_head=config.prompt)
    model, tokenizer = loaded.model, loaded.tokenizer
    head = model_head(model).kind  # a text task gives a decoder a causal-LM head (`models.training_head`)
    spec = scored_as(spec, head)  # a causal LM learns a classification task as prompts (rank classification)
    noise = text_noise(model)  # masked for a masked LM, span-corrupted for T5, whole for a causal LM
    if config.peft:
        model = wrap_peft(model, spec, config)

    train_data = _partitioned(encode(spec, "train", tokenizer, config.max_length), part, spec)
    dev = Evaluator(spec, tokenizer, "dev", config.eval_limit, device=device, max_length=config.max_length)
    recorder = cartography.Recorder(spec, tokenizer, config.cartography, steps=config.steps,
                                    batch_size=config.batch_size, every=config.cartography_every,
                                    part=config.partition, device=device,
                                    max_length=config.max_length) if config.cartography else None

    params = _trainable(model, config)
    if not params:
        raise MergeLabError(f"training {config.base!r} on {spec.name} with these settings leaves no parameter to "
                            "train (a causal LM's head is tied to its frozen embeddings); train the whole model "
                            "(not the head only)", param="head_only")
    optimizer, schedule = _optimizer(params, config)
    generator = torch.Generator().manual_seed(config.seed)
    batches = _length_grouped_batches(train_data.lengths, config.batch_size, generator)

    base_meta = {
        "mergelab": __version__, "kind": config.peft or "full", "base": loaded.ref.spec,
        "base_location": loaded.ref.location, "task": spec.name, "seed": config.seed,
        "partition": str(part), "train_examples": len(train_data), "train": asdict(config),
        "learning_rate": config.learning_rate, "head": head, "labels": list(spec.labels),
        **({"recipe": recipe} if recipe else {}),
    }
    checkpoints: list[dict] = []
    started = time.perf_counter()
    losses: list[float] = []
    with writing(out), staging(out, overwrite=overwrite) as tmp:  # a full disk: one line naming `out`
        model.train()
        bar = _Bar(config.steps, f"train {spec.name}", progress)
        for step in range(1, config.steps + 1):
            batch = _next_batch(train_data, next(batches), tokenizer, generator, spec, device, noise=noise)
            loss = task_loss(model, batch, spec, encoder_grad=not config.head_only)
            if not torch.isfinite(loss):
                raise MergeLabError(f"training diverged at step {step} (loss {loss.item()}); lower the learning rate",
                                    param="lr")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.update(step, losses)
            if recorder is not None and recorder.due(step):  # eval mode draws no random numbers: same run
                recorder.record(model, step)
                model.train()
            if config.save_every and step % config.save_every == 0 and step < config.steps:
                entry = _checkpoint(model, tokenizer, tmp / f"step-{step}", dev, base_meta, step, started, losses)
                checkpoints.append({"step": step, "path": f"step-{step}", "dev": entry["scores"]["dev"]})
                model.train()
        bar.close()
        extra = {"checkpoints": checkpoints} if checkpoints else {}
        if recorder is not None:
            extra["cartography"] = recorder.save(tmp)
        metadata = _checkpoint(model, tokenizer, tmp, dev, {**base_meta, **extra}, config.steps, started, losses)
    return TrainResult(Path(out), metadata)


def _check_language_model_tasks(config: TrainConfig, specs: tuple[TaskSpec, ...], model_type: str) -> None:
    """An encoder-decoder (T5) trains as a language model only: by span corruption on a text task, by rank
    classification on a classification task's prompt; anything else is one line naming the task."""
    for spec in specs:
        if spec.kind == "mlm" or (spec.kind == "classification" and spec.prompt is not None and config.prompt):
            continue
        why = "with prompt=False (a fresh classifier)" if spec.kind == "classification" and spec.prompt else \
            f"on {spec.name} (a {spec.kind} task, with no prompt to rank labels by)"
        raise MergeLabError(f"model {config.base!r} is an encoder-decoder ({model_type}), which MergeLab trains as a "
                            f"language model, not {why}; train it on a text task or on a classification task's "
                            "prompt", param="task")


@dataclass
class _TaskJob:
    """One task of a multi-task run: its head model (on the shared encoder), data and dev scorer."""

    spec: TaskSpec
    model: torch.nn.Module
    data: Encoded
    dev: Evaluator
    batches: object = None

    def head(self) -> dict[str, torch.Tensor]:
        """The head's tensors, named as in the task model's state_dict (`classifier.weight`, ...)."""
        prefix = self.model.base_model_prefix + "."
        return {k: v for k, v in self.model.state_dict().items() if not k.startswith(prefix)}


def _task_schedule(sizes: list[int], sampling: str, steps: int, generator: torch.Generator) -> list[int]:
    """Which task (index) each step takes, drawn up front from the run's generator."""
    if sampling == "round-robin":
        return [step % len(sizes) for step in range(steps)]
    weights = torch.tensor(sizes, dtype=torch.float64) ** (1.0 if sampling == "proportional" else 0.5)
    return torch.multinomial(weights, steps, replacement=True, generator=generator).tolist()


def _bare_config(config):
    """A copy of an encoder config without the task label fields it was loaded with (heads carry those)."""
    clean = copy.deepcopy(config)
    clean.id2label, clean.label2id = {0: "LABEL_0", 1: "LABEL_1"}, {"LABEL_0": 0, "LABEL_1": 1}
    clean.problem_type = None
    return clean


def _train_multitask(config: TrainConfig, specs: tuple[TaskSpec, ...], out: str | Path, *, overwrite: bool,
                     progress: ProgressFn | None, recipe: str | None) -> TrainResult:
    """One shared encoder, one head per task; each step trains on one batch of one sampled task. A causal LM
    learns every task as prompts (rank classification): one model, saved as an ordinary checkpoint."""
    names = [s.name for s in specs]
    if config.peft or config.head_only:
        raise MergeLabError("multi-task training is full fine-tuning of the shared encoder and the heads; "
                            "train no adapter module and not the head alone, or train one task at a time", param="task")
    for spec in specs:
        if spec.kind == "mlm":
            raise MergeLabError(f"multi-task training takes classification, regression and token tasks, not "
                                f"{spec.name} (MLM); train an MLM head alone (head only)", param="task")
    check_out(out, overwrite)  # fail before spending minutes on training
    part = partition.parse(config.partition)
    _seed_everything(config.seed)
    device = settings.device()
    loaded = [load(config.base, spec, new_head=True, device=device, keep_lm_head=config.prompt) for spec in specs]
    tokenizer = loaded[0].tokenizer
    prompted = all(model_head(item.model).kind in LANGUAGE_MODELS for item in loaded)
    if prompted:  # a causal LM reads every task as prompts: one whole model, nothing per task
        specs = tuple(scored_as(spec, model_head(loaded[0].model).kind) for spec in specs)
        encoder = loaded[0].model
        loaded = [loaded[0]] * len(specs)
    else:
        # Share the encoder of a sequence-task model: it has the pooler the sequence heads read (a token
        # model's encoder has none; token heads ignore the pooler's output).
        owner = next((i for i, s in enumerate(specs) if s.head == "sequence"), 0)
        encoder = loaded[owner].model.base_model
        encoder.config = _bare_config(encoder.config)
    jobs = []
    for spec, item in zip(specs, loaded):
        if not prompted:
            setattr(item.model, item.model.base_model_prefix, encoder)
        data = _partitioned(encode(spec, "train", tokenizer, config.max_length), part, spec)
        dev = Evaluator(spec, tokenizer, "dev", config.eval_limit, device=device, max_length=config.max_length)
        jobs.append(_TaskJob(spec, item.model, data, dev))
    ref = loaded[0].ref
    del loaded  # the other encoder copies

    heads = [] if prompted else [p for job in jobs for n, p in job.model.named_parameters()
                                 if not n.startswith(job.model.base_model_prefix + ".")]
    params = list(encoder.parameters()) + heads
    optimizer, schedule = _optimizer(params, config)
    generator = torch.Generator().manual_seed(config.seed)
    order = _task_schedule([len(job.data) for job in jobs], config.sampling, config.steps, generator)
    for job in jobs:
        job.batches = _length_grouped_batches(job.data.lengths, config.batch_size, generator)

    base_meta = {
        "mergelab": __version__, "kind": "multitask", "base": ref.spec, "base_location": ref.location,
        "task": ",".join(names), "tasks": names, "seed": config.seed, "partition": str(part),
        "sampling": config.sampling, "task_steps": {name: order.count(i) for i, name in enumerate(names)},
        "train_examples": {job.spec.name: len(job.data) for job in jobs},
        "train": {**asdict(config), "task": ",".join(names)}, "learning_rate": config.learning_rate,
        "head_kinds": {s.name: s.head for s in specs}, "prompted": prompted,
        "labels": {s.name: list(s.labels) for s in specs},
        **({"recipe": recipe} if recipe else {}),
    }
    checkpoints: list[dict] = []
    started = time.perf_counter()
    losses: list[float] = []
    task_losses: dict[str, list[float]] = {name: [] for name in names}
    with writing(out), staging(out, overwrite=overwrite) as tmp:
        for job in jobs:
            job.model.train()
        bar = _Bar(config.steps, f"train {len(jobs)} tasks", progress)
        for step in range(1, config.steps + 1):
            job = jobs[order[step - 1]]
            batch = _next_batch(job.data, next(job.batches), tokenizer, generator, job.spec, device)
            loss = task_loss(job.model, batch, job.spec)  # the inputs the family takes (`model_inputs`)
            if not torch.isfinite(loss):
                raise MergeLabError(f"training diverged at step {step} on {job.spec.name} (loss {loss.item()}); "
                                    "lower the learning rate", param="lr")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)  # heads of the other tasks have no gradient: untouched
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            task_losses[job.spec.name].append(loss.item())
            bar.update(step, losses)
            if config.save_every and step % config.save_every == 0 and step < config.steps:
                entry = _checkpoint_multitask(jobs, encoder, tokenizer, tmp / f"step-{step}", base_meta, step,
                                              started, losses, task_losses)
                checkpoints.append({"step": step, "path": f"step-{step}", "dev": entry["scores"]["dev"]})
                for other in jobs:
                    other.model.train()
        bar.close()
        extra = {"checkpoints": checkpoints} if checkpoints else {}
        metadata = _checkpoint_multitask(jobs, encoder, tokenizer, tmp, {**base_meta, **extra}, config.steps,
                                         started, losses, task_losses)
    return TrainResult(Path(out), metadata)


def _checkpoint_multitask(jobs: list[_TaskJob], encoder, tokenizer, folder: Path, base_meta: dict, step: int,
                          started: float, losses: list[float], task_losses: dict[str, list[float]]) -> dict:
    scores = {job.spec.name: job.dev(job.model) for job in jobs}
    metadata = {**base_meta, "steps": step, "train_loss": float(np.mean(losses[-50:])),
                "task_train_loss": {t: float(np.mean(v[-20:])) if v else None for t, v in task_losses.items()},
                "train_seconds": round(time.perf_counter() - started, 1), "scores": {"dev": scores},
                "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if metadata["prompted"]:  # one causal LM for every task: an ordinary checkpoint
        write_into(folder, encoder, tokenizer, metadata)
        return metadata
    write_multihead(folder, encoder, {job.spec.name: job.head() for job in jobs}, tokenizer, metadata)
    return {**metadata, "heads": {job.spec.name: f"heads/{job.spec.name}.safetensors" for job in jobs}}


def _partitioned(data: Encoded, part: partition.Partition, spec: TaskSpec) -> Encoded:
    """The examples of `data` in partition `part` (all of them for `iid`)."""
    if part.shards == 1:
        return data
    # Token and MLM tasks have one label per token, not per example (only iid shards apply to them).
    labels = torch.zeros(len(data), dtype=torch.long) if data.token_level else data.labels
    return data.subset(partition.indices(part, spec, labels))


def _optimizer(params: list[torch.nn.Parameter], config: TrainConfig):
    """AdamW with linear warm-up over `config.warmup` of the steps, then linear decay to 0."""
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    warmup = max(1, int(config.warmup * config.steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (config.steps - step) / (config.steps - warmup + 1e-9))))
    return optimizer, schedule


def train_batches(spec: TaskSpec, tokenizer, batch_size: int, seed: int, device, *,
                  max_length: int = 128, noise: str | None = "mask"):
    """An endless, seeded stream of training batches of `spec` on `device` (a text task's corrupted on the
    fly as `noise` says: `losses.text_noise`)."""
    data = encode(spec, "train", tokenizer, max_length)
    generator = torch.Generator().manual_seed(seed)
    for index in _length_grouped_batches(data.lengths, batch_size, generator):
        yield _next_batch(data, index, tokenizer, generator, spec, device, noise=noise)


def _next_batch(data: Encoded, index: torch.Tensor, tokenizer, generator, spec: TaskSpec, device, *,
                noise: str | None = "mask") -> dict:
    """The batch of examples `index`, right-padded with `pad_id`. A text task's batch is masked for a masked
    LM (`noise` "mask"), span-corrupted for an encoder-decoder ("spans") and left whole for a causal LM
    (None), which predicts every next token."""
    batch = data.batch(index, pad_id(tokenizer))
    if spec.kind == "mlm" and noise == "spans":
        batch = spans.corrupt_batch(batch, tokenizer, generator, pad_id(tokenizer))
    elif spec.kind == "mlm" and noise == "mask":
        batch["input_ids"], batch["labels"] = mlm_mask(batch["input_ids"], tokenizer, generator)
        batch["labels"] = torch.where(batch["attention_mask"].bool(), batch["labels"], -100)
    return {k: v.to(device) for k, v in batch.items()}


def _checkpoint(model, tokenizer, folder: Path, dev: Evaluator, base_meta: dict, step: int, started: float,
                losses: list[float]) -> dict:
    scores = dev(model)
    metadata = {**base_meta, "steps": step, "train_loss": float(np.mean(losses[-50:])),
                "loss_curve": loss_curve(losses), "train_seconds": round(time.perf_counter() - started, 1),
                "scores": {"dev": scores}, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_into(folder, model, tokenizer, metadata)
    return metadata


def loss_curve(losses: list[float], points: int = 50) -> list[list[float]]:
    """The training loss as at most `points` [last step, mean loss] pairs over equal windows of steps: a
    run's learning curve, small enough to keep in its metadata."""
    width = max(1, math.ceil(len(losses) / points))
    return [[min(i + width, len(losses)), round(float(np.mean(losses[i: i + width])), 5)]
            for i in range(0, len(losses), width)]


class _Bar:
    """Training progress: a tqdm bar with the running loss, or the app's callback."""

    def __init__(self, total: int, desc: str, progress: ProgressFn | None):
        from tqdm.auto import tqdm

        self.total, self.desc, self.progress = total, desc, with_eta(progress)
        self.tqdm = tqdm(total=total, desc=desc, disable=None, leave=False) if progress is None else None

    def update(self, step: int, losses: list[float]) -> None:
        recent = float(np.mean(losses[-20:]))
        if self.tqdm is not None:
            self.tqdm.update(1)
            self.tqdm.set_postfix(loss=f"{recent:.3f}", refresh=False)
        elif step % 5 == 0 or step == self.total:
            done = "" if step < self.total else ", scoring on dev"
            self.progress(step / self.total, f"{self.desc}: step {step}/{self.total}, loss {recent:.3f}{done}")

    def close(self) -> None:
        if self.tqdm is not None:
            self.tqdm.close()
