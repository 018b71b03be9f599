"""The task registry: what each task is, where its data lives, and how it is scored.

A task is data only. Adding a GLUE-format task (RTE, QNLI, ...) is one `TaskSpec` entry below: the
readers in `data.py`, the tokenization in `encode.py`, the metrics and the training loop are shared
by every task of the same kind.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from .errors import MergeLabError

# "rank": a classification task as a causal LM is trained and scored on it (`scored_as`, `prompts`)
Kind = Literal["classification", "regression", "token", "mlm", "rank"]
Format = Literal["glue", "semicolon", "conll", "text", "corpus"]


@dataclass(frozen=True)
class HubSource:
    """Where `datasets.load_dataset` finds the task when the data root lacks it (online only)."""

    path: str
    config: str | None
    splits: dict[str, str]  # MergeLab split -> hub split
    text_columns: tuple[str, ...]
    label_column: str | None  # labels on the hub are already indices in `TaskSpec.labels` order


@dataclass(frozen=True)
class Prompt:
    """How a language model reads a classification task: the example's text columns put into `template`
    (`{0}`, `{1}`: the text columns in order), then one verbalizer per label, in label order, as the
    continuation whose likelihood ranks that label (rank classification, as T0 scores: Sanh et al. 2022,
    arXiv:2110.08207, Sec. 3; `prompts`)."""

    template: str
    verbalizers: tuple[str, ...]


@dataclass(frozen=True)
class TaskSpec:
    name: str  # canonical id, e.g. "sst2"
    title: str  # display name, e.g. "SST-2"
    kind: Kind
    format: Format  # which local reader parses it
    directory: str  # folder under the data root, e.g. "glue/SST-2"
    files: dict[str, str]  # split -> file name inside `directory`
    metrics: tuple[str, ...]  # the first is the headline metric
    labels: tuple[str, ...] = ()  # label names in index order (empty for regression / MLM)
    text_columns: tuple[str, ...] = ()  # GLUE: header names of the text columns (one or two)
    label_column: str = ""  # GLUE: header name of the label column
    positional: dict[str, int] = field(default_factory=dict)  # header-less files: column -> index
    hub: HubSource | None = None
    aliases: tuple[str, ...] = ()
    fallback_files: dict[str, str] = field(default_factory=dict)  # split -> file used when the first is absent
    listed: bool = True  # False: an internal task (pretraining text), not offered where users pick tasks to score
    prompt: Prompt | None = None  # classification tasks: how a causal LM reads them (rank classification)

    @property
    def num_labels(self) -> int:
        return 1 if self.kind == "regression" else len(self.labels)

    @property
    def main_metric(self) -> str:
        return self.metrics[0]

    @property
    def lower_is_better(self) -> bool:
        return self.main_metric in ("loss", "perplexity")

    @property
    def head(self) -> str:
        """The head type a model is given to train on this task: "sequence", "token" or "mlm"."""
        return {"classification": "sequence", "regression": "sequence", "token": "token", "mlm": "mlm",
                "rank": "causal"}[self.kind]

    @property
    def heads(self) -> tuple[str, ...]:
        """The head kinds that can be scored on this task (`SCORING_HEADS`), `head` first; a language model
        too on a classification task with a prompt (rank classification)."""
        prompted = LANGUAGE_MODELS if self.kind == "classification" and self.prompt is not None else ()
        return SCORING_HEADS[self.kind] + prompted


# The head kinds (`models.HeadInfo.kind`) each kind of task can score. A text task is scored by a masked LM
# (loss on masked tokens), a causal LM (next-token loss, `evaluation`) or an encoder-decoder (span
# corruption, `spans`); labelled tasks need their head, or a prompt for a language model (`TaskSpec.heads`).
LANGUAGE_MODELS = ("causal", "seq2seq")  # heads that score a classification task's prompts
SCORING_HEADS: dict[str, tuple[str, ...]] = {"classification": ("sequence",), "regression": ("sequence",),
                                             "token": ("token",), "mlm": ("mlm",) + LANGUAGE_MODELS, "rank": LANGUAGE_MODELS}


def scored_as(spec: TaskSpec, head_kind: str | None) -> TaskSpec:
    """The task as a model with a head of `head_kind` is trained and scored on it: a classification task with
    a prompt becomes rank classification (kind "rank") for a causal LM or an encoder-decoder (T5); anything
    else is itself."""
    if head_kind in LANGUAGE_MODELS and spec.kind == "classification" and spec.prompt is not None:
        return replace(spec, kind="rank")
    return spec


YES_NO = ("yes", "no")
NO_YES = ("no", "yes")


def _glue(name: str, title: str, kind: Kind, text_columns: tuple[str, ...], label_column: str,
          metrics: tuple[str, ...], labels: tuple[str, ...] = (), hub_columns: tuple[str, ...] = (),
          dev_file: str = "dev.tsv", hub_dev: str = "validation", **extra) -> TaskSpec:
    return TaskSpec(
        name=name, title=title, kind=kind, format="glue", directory=f"glue/{title}",
        files={"train": "train.tsv", "dev": dev_file}, metrics=metrics, labels=labels,
        text_columns=text_columns, label_column=label_column,
        hub=HubSource("nyu-mll/glue", name, {"train": "train", "dev": hub_dev},
                      hub_columns or text_columns, "label"),
        aliases=(title.lower(), title.lower().replace("-", "")), **extra,
    )


ENTAILMENT2 = ("entailment", "not_entailment")

TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in [
        # CoLA has no header: source, label, original label mark, sentence.
        _glue("cola", "CoLA", "classification", ("sentence",), "label", ("mcc", "accuracy"),
              ("unacceptable", "acceptable"), positional={"label": 1, "sentence": 3},
              prompt=Prompt("{0} Is this sentence grammatical?", NO_YES)),
        _glue("sst2", "SST-2", "classification", ("sentence",), "label", ("accuracy",), ("negative", "positive"),
              prompt=Prompt("Review: {0} Sentiment:", ("negative", "positive"))),
        _glue("mrpc", "MRPC", "classification", ("#1 String", "#2 String"), "Quality", ("f1", "accuracy"),
              ("not_equivalent", "equivalent"), hub_columns=("sentence1", "sentence2"),
              prompt=Prompt("Sentence 1: {0} Sentence 2: {1} Do they mean the same?", NO_YES)),
        _glue("stsb", "STS-B", "regression", ("sentence1", "sentence2"), "score", ("pearson", "spearman")),
        _glue("rte", "RTE", "classification", ("sentence1", "sentence2"), "label", ("accuracy",), ENTAILMENT2,
              prompt=Prompt("{0} Question: does it follow that {1}", YES_NO)),
        _glue("qnli", "QNLI", "classification", ("question", "sentence"), "label", ("accuracy",), ENTAILMENT2,
              prompt=Prompt("Question: {0} Sentence: {1} Does the sentence answer the question?", YES_NO)),
        _glue("wnli", "WNLI", "classification", ("sentence1", "sentence2"), "label", ("accuracy",),
              ("not_entailment", "entailment"), prompt=Prompt("{0} Question: does it follow that {1}", NO_YES)),
        _glue("qqp", "QQP", "classification", ("question1", "question2"), "is_duplicate", ("f1", "accuracy"),
              ("not_duplicate", "duplicate"),
              prompt=Prompt("Question 1: {0} Question 2: {1} Do they ask the same?", NO_YES)),
        _glue("mnli", "MNLI", "classification", ("sentence1", "sentence2"), "gold_label", ("accuracy",),
              ("entailment", "neutral", "contradiction"), hub_columns=("premise", "hypothesis"),
              dev_file="dev_matched.tsv", hub_dev="validation_matched",
              prompt=Prompt("{0} Question: does it follow that {1}", ("yes", "maybe", "no"))),
        TaskSpec(
            name="emotion", title="Emotion", kind="classification", format="semicolon", directory="emotion",
            files={"train": "train.txt", "dev": "val.txt", "test": "test.txt"},
            metrics=("accuracy", "macro_f1"),
            labels=("sadness", "joy", "love", "anger", "fear", "surprise"),
            hub=HubSource("dair-ai/emotion", None, {"train": "train", "dev": "validation", "test": "test"},
                          ("text",), "label"),
            prompt=Prompt("Text: {0} Emotion:", ("sadness", "joy", "love", "anger", "fear", "surprise")),
        ),
        TaskSpec(
            name="conll2003", title="CoNLL-2003 NER", kind="token", format="conll", directory="conll2003",
            files={"train": "train.txt", "dev": "dev.txt", "test": "test.txt"},
            metrics=("f1", "precision", "recall", "token_accuracy"),
            labels=("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"),
            hub=HubSource("eriktks/conll2003", None, {"train": "train", "dev": "validation", "test": "test"},
                          ("tokens",), "ner_tags"),
            aliases=("ner", "conll"),
        ),
        TaskSpec(
            # titled by its text, not by one way of scoring it: a masked LM is scored by MLM loss, a causal
            # LM by next-token loss, and tables name the loss from the scores (`metrics.metric_label`)
            name="wikitext2", title="WikiText-2", kind="mlm", format="text", directory="wikitext-2",
            files={"train": "train.txt", "dev": "valid.txt", "test": "test.txt"},
            # The shared data root ships no train.txt: training (the MLM head, small pretraining) then
            # reads test.txt, so dev (valid.txt) stays held out. Reported MLM scores use dev.
            fallback_files={"train": "test.txt"},
            metrics=("loss", "perplexity"),
            hub=HubSource("Salesforce/wikitext", "wikitext-2-v1",
                          {"train": "train", "dev": "validation", "test": "test"}, ("text",), None),
            aliases=("mlm", "wikitext", "wikitext-2"),
        ),
        TaskSpec(
            # Pretraining text from scratch (the different-initialization zoo): the train split is every
            # training text in the data root (WikiText-2's test.txt and the sentences of the other tasks'
            # train splits), the dev split WikiText-2's valid.txt, so its MLM scores compare with wikitext2's.
            name="corpus", title="Data-root text", kind="mlm", format="corpus", directory="wikitext-2",
            files={"train": "test.txt", "dev": "valid.txt"}, metrics=("loss", "perplexity"),
            aliases=("text", "pretraining"), listed=False,
        ),
    ]
}

_LOOKUP = {key: spec for spec in TASKS.values() for key in (spec.name, *spec.aliases)}


def get_task(name: str) -> TaskSpec:
    """Look a task up by id or alias (case-insensitive): "sst2", "SST-2", "ner", "mlm", ..."""
    spec = _LOOKUP.get(name.strip().lower())
    if spec is None:
        raise MergeLabError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return spec


def tasks_for_head(kind: str | None) -> list[str]:
    """The listed tasks a model with a head of `kind` can be scored on (a causal LM: wikitext2)."""
    return [spec.name for spec in TASKS.values() if spec.listed and kind in spec.heads]


def listed_as(name: str) -> str:
    """The listed task a model trained on task `name` is scored on where users pick tasks: the task itself,
    or for an internal one (the pretraining text `corpus`) the listed task of the same kind whose dev split
    is the same file (WikiText-2)."""
    spec = get_task(name)
    if spec.listed:
        return spec.name
    return next((other.name for other in TASKS.values() if other.listed and other.kind == spec.kind
                 and other.directory == spec.directory and other.files.get("dev") == spec.files.get("dev")),
                spec.name)


def title(name: str) -> str:
    """A task's name as people know it ("SST-2" for "sst2"); unknown names are returned as given."""
    try:
        return get_task(name).title
    except MergeLabError:
        return name


def split_names(spec: TaskSpec) -> list[str]:
    return list(spec.files)
