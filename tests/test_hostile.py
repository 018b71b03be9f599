"""Hostile input to the public app: every named endpoint, driven through gradio_client as an anonymous
visitor, with server paths, traversal, odd names, hub ids, NaN and huge counts, bad choices and method
parameters, admin token guesses and malformed uploads.

Each case must be refused with one line that names the input (its control's label, or the offending
value), and must leave no trace: nothing written outside the session folders, no server path in the
message, no request to the hub (a stand-in HTTP server on 127.0.0.1 plays the hub, with offline mode
off, and records every request), and no traceback in the server's output.

A case Gradio refuses before the handler runs (a value outside a radio's choices) counts when Gradio's
message is one line too; where Gradio instead fails with its generic "upstream Gradio app has raised an
exception" (its preprocessing crashes), the case is an expected failure marked `gradio: ...`; one where
the engine is at fault is marked `engine: ...`. Expected failures may fail only on the message
(`Unfriendly`): the safety checks (writes, paths, hub requests) run first and must pass in every case.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
import struct
import sys
import tempfile
import threading
import warnings
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

pytestmark = pytest.mark.integration  # end to end and slow: deselect with -m 'not integration'

gradio_client = pytest.importorskip("gradio_client")
AppError = gradio_client.exceptions.AppError

REPO = Path(__file__).resolve().parent.parent
TOKEN = "s3cret-hostile-token"
TAG = f"mergelab-hostile-{os.getpid()}"  # every path a case names outside the app has this in it
GENERIC = "The upstream Gradio app has raised an exception"
MAX_MESSAGE = 1000  # characters: a refusal quotes a bad value, it does not echo it whole
LIMITS = {"EXAMPLES": 8, "POINTS": 5, "GRID": 4, "BEND_STEPS": 20, "ALIGN_EXAMPLES": 16, "SEEDS": 3, "SHOTS": 16,
          "STEPS": 10, "UPLOAD_MB": 1}
NAN, INF = float("nan"), float("inf")
NO_INPUTS = ("/zoo_list", "/stop", "/zoo_table")  # endpoints without inputs: junk sent to them is ignored


class Unfriendly(AssertionError):
    """The refusal is not one clean line naming the input, or the server printed a traceback."""


# ----------------------------------------------------------------------------------------------------
# the cases


@dataclass(frozen=True)
class Upload:
    """A file the test writes (`folder/name`), uploaded by the client as that name."""

    path: str


@dataclass
class Case:
    endpoint: str
    kwargs: dict[str, Any]
    expect: str | None  # a regular expression the message must match (None: an endpoint without inputs)
    id: str
    raw: bool = False  # sent as plain HTTP (the client would upload a local path instead of sending it)
    marks: list = field(default_factory=list)


BASE: dict[str, dict[str, Any]] = {
    "/evaluate": {"model": "pico-sst2", "tasks": ["sst2"], "split": "dev", "limit": 4},
    "/merge": {"models": ["pico-sst2", "pico-cola"], "base": "", "method": "average", "params": {},
               "components": ["embeddings", "attention", "feed_forward", "layer_norm", "pooler", "head", "mlm_head"],
               "fallback": "average", "heads": "auto", "limit": 4, "compare": False, "multitask": "", "out": "",
               "space": "weights", "pairwise": False, "dtype": "", "shard_size": ""},
    "/curve": {"a": "pico-sst2", "b": "pico-cola", "tasks": ["sst2"], "points": 3, "path": "line", "limit": 4,
               "head_from": "", "base": "", "merges": [], "bend_steps": 10},
    "/knowledge": {"a": "pico-sst2", "b": "pico-cola", "tasks": ["sst2"], "points": 3, "limit": 4, "head_from": "",
                   "base": "", "examples": "dev"},
    "/plane": {"a": "pico-sst2", "b": "pico-cola", "c": "pico-mrpc", "task": "sst2", "grid": 3, "limit": 4,
               "merges": [], "base": "", "show": "metric"},
    "/align": {"a": "pico-sst2", "b": "pico-cola", "merge_type": "ff+attn", "attention": "head-perm",
               "residual": "first", "qk": False, "text": "sst2", "examples": 8, "tasks": [], "points": 3, "limit": 4,
               "method": "permute", "tokens": 0, "zip_same": 0.0},
    "/ensemble": {"target": "sst2", "kind": "lora", "sources": [], "similarity": "loss", "log10_t": -1.0,
                  "granularity": "model", "shots": 8, "seeds": "0", "steps": 5, "limit": 4},
    "/ensemble_matrix": {"kind": "lora", "similarity": "loss", "log10_t": -1.0, "shots": 8},
    "/zoo_build": {"recipe": "tiny", "token": TOKEN},
    "/zoo_demo": {"token": TOKEN},
    "/upload": {"files": [], "name": "mine"},
    "/sweep": {"method": "ties", "models": ["pico-sst2", "pico-cola"], "base": "", "space": "lambda=0.5:1:2",
               "per_layer": False, "algorithm": "grid", "trials": 4, "dev_size": 4, "holdout_size": 0, "workers": 1},
    "/sweep_materialize": {"name": "ties-0123456789", "out": ""},
}

CASES: list[Case] = []


def gradio_crash(why: str) -> pytest.MarkDecorator:
    return pytest.mark.xfail(strict=True, raises=Unfriendly, reason=f"gradio: {why}")


PATH_CRASH = gradio_crash("a FileData naming a server file is refused with InvalidPathError, shown as the generic "
                          "error (safe, but not one line naming the input) and logged with a traceback")
LIST_CRASH = gradio_crash("a plain string in a File list fails pydantic validation (ListFiles), shown as the generic "
                          "error and logged with a traceback")

def case(endpoint: str, id: str, expect: str | None, *, raw: bool = False, marks=(), **override) -> None:
    kwargs = {**BASE.get(endpoint, {}), **override}
    CASES.append(Case(endpoint, kwargs, expect, f"{endpoint[1:]}-{id}", raw, list(marks)))


# -- model names: paths, traversal, odd names, hub ids, in every model field ----------------------------

NAMES = {  # id -> a name no visitor may use
    "abs": f"/tmp/{TAG}",
    "server-model": "<HOME>/zoo/pico-sst2",  # a real model, by its server path
    "dotdot": "../zoo/pico-sst2",
    "tilde": f"~/{TAG}",
    "file-url": "file:///etc/passwd",
    "proc-link": "/proc/self/root/etc",
    "long": "x" * 5000,
    "nul": "pico\x00sst2",
    "newline": "pico\nsst2",
    "linesep": "pico\u2028sst2",
    "unicode": "pïcö‐sst2",
    "hub-org": "org/model",
    "hub-bare": "bert-base-uncased",
    "hub-url": "https://huggingface.co/org/model",
    "result-traversal": "merges/../../zoo/pico-sst2",
    "unknown-result": "merges/nothing",
    "unknown": "no-such-model",
}
FEW = ("abs", "server-model", "dotdot", "nul", "hub-org", "hub-bare", "result-traversal")
MODEL_FIELDS = [  # endpoint, field, label, which names, how the field takes a name, extra settings
    ("/evaluate", "model", "Model", tuple(NAMES), str, {}),
    ("/merge", "models", "Checkpoints", tuple(NAMES), lambda n: [n, "pico-cola"], {}),
    ("/merge", "base", "Base model", FEW, str, {}),
    ("/merge", "multitask", "Multi-task model", FEW, str, {"compare": True}),
    ("/curve", "a", r"Checkpoints \(A, B, C\)", FEW, str, {}),
    ("/curve", "b", r"Checkpoints \(A, B, C\)", FEW, str, {}),
    ("/curve", "head_from", "Head from", FEW, str, {}),
    ("/curve", "base", "Base model", FEW, str, {}),
    ("/knowledge", "a", r"Checkpoints \(A, B, C\)", FEW, str, {}),
    ("/knowledge", "b", r"Checkpoints \(A, B, C\)", FEW, str, {}),
    ("/knowledge", "base", "Base model", FEW, str, {}),
    ("/plane", "c", r"Checkpoints \(A, B, C\)", FEW, str, {}),
    ("/plane", "base", "Base model", FEW, str, {}),
    ("/align", "a", r"A \(reference basis\)", FEW, str, {}),
    ("/align", "b", r"B \(permuted into A's basis\)", FEW, str, {}),
    ("/ensemble", "sources", "Source modules", FEW, lambda n: [n], {}),
    ("/sweep", "models", "Checkpoints", FEW, lambda n: [n, "pico-cola"], {}),
    ("/sweep", "base", "Base model", FEW, str, {}),
]
for endpoint, name, label, which, wrap, extra in MODEL_FIELDS:
    for key in which:
        case(endpoint, f"{name}-{key}", rf"^{label}: model .* is not available here", **extra,
             **{name: wrap(NAMES[key])})
    odd = [3] if name in ("models", "sources") else 3
    case(endpoint, f"{name}-number", rf"^{label}: pick (a model|models|modules) by (its name|their names)", **extra,
         **{name: odd})

# missing and one-string model fields
case("/evaluate", "model-empty", r"no model given", model="")
case("/evaluate", "model-blank", r"no model given", model="   ")
case("/evaluate", "model-none", r"no model given", model=None)
case("/merge", "models-empty", r"^Checkpoints: pick the checkpoints", models=[])
case("/merge", "dtype-int8", r"^Output dtype: .*not in the list of choices", dtype="int8")
case("/merge", "shard-size-path", r"^Shard size: shard size .* is not a size", shard_size="../../etc")
case("/merge", "pairwise-multitask-dotdot", r"^Multi-task model: model .* is not available here", pairwise=True,
     multitask=NAMES["dotdot"])
case("/merge", "models-none", r"^Checkpoints: pick the checkpoints", models=None)
case("/merge", "models-one-string", r"^Checkpoints: model 'passwd' is not available here", models="/etc/passwd")
case("/merge", "models-dict", r"^Checkpoints: pick models by their names", models=[{"path": "/etc"}])
case("/merge", "models-huge-count", r"^Checkpoints: 100000 is more than this app allows \(6\)",
     models=["pico-sst2"] * 100_000)
case("/merge", "models-seven", r"^Checkpoints: 7 is more than this app allows \(6\)", models=["pico-sst2"] * 7)
case("/curve", "a-empty", r"^Checkpoints \(A, B, C\): pick two checkpoints", a="")
case("/knowledge", "a-empty", r"^Checkpoints \(A, B, C\): pick two checkpoints", a="")
case("/knowledge", "points-over-limit", r"^Points: 20 is more than this app allows \(5\)", points=20)
case("/knowledge", "limit-huge", r"^Limit: 1000000000 is more than this app allows \(8\)", limit=10**9)
case("/knowledge", "examples-unknown", r"^Examples: ", examples="../dev")
case("/align", "method-unknown", r"^Method: ", method="../zip")
case("/align", "zip_same-nan", r"^Same-model pairs: ", method="zip", zip_same=float("nan"))
case("/curve", "b-none", r"^Checkpoints \(A, B, C\): pick two checkpoints", b=None)
case("/plane", "c-none", r"^Checkpoints \(A, B, C\): pick three checkpoints", c=None)
case("/align", "a-none", r"^A \(reference basis\): pick two checkpoints", a=None)
case("/ensemble", "sources-one-string", r"^Source modules: model 'passwd' is not available here",
     sources="/etc/passwd")
case("/ensemble", "sources-huge-count", r"^Source modules: 100000 is more than this app allows \(6\)",
     sources=["x"] * 100_000)

# -- output names --------------------------------------------------------------------------------------

OUTS = {
    "abs": f"/tmp/{TAG}",
    "server-zoo": "<HOME>/zoo/planted",
    "dotdot-zoo": "../zoo/planted",
    "dotdot": "..",
    "dot": ".",
    "hidden": ".hidden",
    "tilde": f"~/{TAG}",
    "nested": "a/b",
    "result-like": "merges/x",
    "too-long": "x" * 65,
    "huge": "x" * 100_000,
    "nul": "a\x00b",
    "newline": "a\nb",
    "unicode": "ünï",
    "file-url": f"file:///tmp/{TAG}",
    "space": "a b",
    "dash": "-rf",
    "list": ["a"],
}
for key, out in OUTS.items():
    case("/merge", f"out-{key}", r"^Output folder: output name .* must be a plain name", out=out)
    case("/upload", f"name-{key}", r"^Name: output name .* must be a plain name", name=out)

# -- numbers: NaN, inf, negative, zero, huge, strings --------------------------------------------------

NUMBERS = [  # endpoint, field, label, [(id, value, expect or None for Gradio's bound message, marks)]
    ("/evaluate", "limit", r"Limit", [
        ("nan", NAN, None, []), ("inf", INF, None, []),
        ("minus-inf", -INF, r"^[^:\n]+: Value -inf is less than minimum value 0", []),  # 0 is "all"
        ("negative", -1, r"^[^:\n]+: Value -1 is less than minimum value 0", []),
        ("1e30", 1e30, r"^Limit: 1000000000000000019884624838656 is more than this app allows \(8\)", []),
        ("huge-int", 10**20, r"^Limit: 100000000000000000000 is more than this app allows \(8\)", []),
        ("over-limit", 9, r"^Limit: 9 is more than this app allows \(8\)", []),
        ("string", "abc", None, []), ("nan-string", "nan", None, []),
        ("1e400-string", "1e400", None, [])]),
    ("/merge", "limit", r"Limit", [
        ("nan", NAN, None, []), ("inf", INF, None, []),
        ("negative", -1, r"^[^:\n]+: Value -1 is less than minimum value 0", []),
        ("1e30", 1e30, r"^Limit: 1000000000000000019884624838656 is more than this app allows", []),
        ("string", "abc", None, [])]),
    ("/curve", "points", r"Points", [
        ("nan", NAN, r"^Points: nan is not a number", []),
        ("inf", INF, r"^[^:\n]+: Value inf is greater than maximum value 51", []),
        ("negative", -1, r"^[^:\n]+: Value -1 is less than minimum value 2", []),
        ("one", 1, r"^[^:\n]+: Value 1 is less than minimum value 2", []),
        ("1e30", 1e30, r"^[^:\n]+: Value 1e\+30 is greater than maximum value 51", []),
        ("over-limit", 20, r"^Points: 20 is more than this app allows \(5\)", []),
        ("string", "abc", None, [])]),
    ("/curve", "bend_steps", r"Bezier bend steps", [
        ("nan", NAN, r"^Bezier bend steps: nan is not a number", []),
        ("zero", 0, r"^[^:\n]+: Value 0 is less than minimum value 10", []),
        ("1e30", 1e30, r"^[^:\n]+: Value 1e\+30 is greater than maximum value 1000", []),
        ("over-limit", 500, r"^Bezier bend steps: 500 is more than this app allows \(20\)", [])]),
    ("/curve", "limit", r"Limit", [
        ("nan", NAN, None, []),
        ("huge", 10**9, r"^Limit: 1000000000 is more than this app allows \(8\)", [])]),
    ("/plane", "grid", r"Grid points per axis", [
        ("nan", NAN, r"^Grid points per axis: nan is not a number", []),
        ("zero", 0, r"^[^:\n]+: Value 0 is less than minimum value 3", []),
        ("1e30", 1e30, r"^[^:\n]+: Value 1e\+30 is greater than maximum value 15", []),
        ("over-limit", 9, r"^Grid points per axis: 9 is more than this app allows \(4\)", []),
        ("string", "x", None, [])]),
    ("/plane", "limit", r"Limit", [
        ("negative", -1, r"^[^:\n]+: Value -1 is less than minimum value 0", []),
        ("huge", 10**9, r"^Limit: 1000000000 is more than this app allows \(8\)", [])]),
    ("/align", "examples", r"Examples", [
        ("nan", NAN, None, []), ("inf", INF, None, []),
        ("negative", -1, r"^[^:\n]+: Value -1 is less than minimum value 1", []),
        ("zero", 0, r"^[^:\n]+: Value 0 is less than minimum value 1", []),
        ("1e30", 1e30, r"^Examples: 1000000000000000019884624838656 is more than this app allows \(16\)", []),
        ("over-limit", 10**6, r"^Examples: 1000000 is more than this app allows \(16\)", []),
        ("string", "x", None, [])]),
    ("/align", "points", r"Points per curve", [
        ("nan", NAN, r"^Points per curve: nan is not a number", []),
        ("zero", 0, r"^[^:\n]+: Value 0 is less than minimum value 2", []),
        ("1e30", 1e30, r"^[^:\n]+: Value 1e\+30 is greater than maximum value 26", []),
        ("over-limit", 20, r"^Points per curve: 20 is more than this app allows \(5\)", [])]),
    ("/align", "limit", r"Limit", [
        ("inf", INF, None, []),
        ("huge", 10**9, r"^Limit: 1000000000 is more than this app allows \(8\)", [])]),
    ("/ensemble", "log10_t", r"log10 temperature", [
        ("nan", NAN, r"^log10 temperature: nan is not a number", []),
        ("inf", INF, r"^[^:\n]+: Value inf is greater than maximum value 2", []),
        ("minus-1e30", -1e30, r"^[^:\n]+: Value -1e\+30 is less than minimum value -3", []),
        ("string", "x", None, [])]),
    ("/ensemble", "shots", r"Shots", [
        ("nan", NAN, r"^Shots: nan is not a number", []),
        ("negative", -1, r"^[^:\n]+: Value -1 is less than minimum value 4", []),
        ("zero", 0, r"^[^:\n]+: Value 0 is less than minimum value 4", []),
        ("1e30", 1e30, r"^[^:\n]+: Value 1e\+30 is greater than maximum value 128", []),
        ("over-limit", 100, r"^Shots: 100 is more than this app allows \(16\)", [])]),
    ("/ensemble", "steps", r"Steps", [
        ("nan", NAN, r"^Steps: nan is not a number", []),
        ("1e30", 1e30, r"^[^:\n]+: Value 1e\+30 is greater than maximum value 200", []),
        ("over-limit", 150, r"^Steps: 150 is more than this app allows \(10\)", [])]),
    ("/ensemble", "limit", r"Dev limit", [
        ("nan", NAN, None, []),
        ("huge", 10**9, r"^Dev limit: 1000000000 is more than this app allows \(8\)", [])]),
    ("/ensemble_matrix", "log10_t", r"log10 temperature", [
        ("nan", NAN, r"^log10 temperature: nan is not a number", [])]),
    ("/ensemble_matrix", "shots", r"Shots", [
        ("nan", NAN, r"^Shots: nan is not a number", []),
        ("1e30", 1e30, r"^[^:\n]+: Value 1e\+30 is greater than maximum value 128", []),
        ("over-limit", 100, r"^Shots: 100 is more than this app allows \(16\)", []),
        ("string", "x", None, [])]),
]
for endpoint, name, label, values in NUMBERS:
    for key, value, expect, marks in values:
        case(endpoint, f"{name}-{key}", expect or rf"^{label}:", marks=marks, **{name: value})

# -- choices: tasks, splits, methods, components, fallback, heads, kinds, measures ------------------------

CHOICE = r"^[^:\n]+: Value: .*is not in the list of choices"
CHOICES = [  # endpoint, id, expect, marks, override
    ("/evaluate", "tasks-unknown", CHOICE, [], {"tasks": ["nope"]}),
    ("/evaluate", "tasks-traversal", CHOICE, [], {"tasks": ["../sst2"]}),
    ("/evaluate", "tasks-string", CHOICE, [], {"tasks": "sst2"}),
    ("/evaluate", "tasks-number", CHOICE, [], {"tasks": [1]}),
    ("/evaluate", "tasks-empty", r"no task selected", [], {"tasks": []}),
    ("/evaluate", "tasks-none", r"^Tasks:", [], {"tasks": None}),
    ("/evaluate", "split-unknown", CHOICE, [], {"split": "nope"}),
    ("/evaluate", "split-traversal", CHOICE, [], {"split": "../dev"}),
    ("/evaluate", "split-empty", CHOICE, [], {"split": ""}),
    ("/evaluate", "split-none", r"^Split: pick a split", [], {"split": None}),
    ("/evaluate", "split-number", CHOICE, [], {"split": 1}),
    ("/merge", "method-unknown", CHOICE, [], {"method": "nope"}),
    ("/merge", "method-empty", CHOICE, [], {"method": ""}),
    ("/merge", "method-none", r"^Method: unknown merge method None", [], {"method": None}),
    ("/merge", "method-path", CHOICE, [], {"method": "../methods/linear"}),
    ("/merge", "method-newline", r"^Method: Value: average x is not in the list", [], {"method": "average\nx"}),
    ("/merge", "method-huge", r"^Method: Value: x+…$", [], {"method": "x" * 100_000}),
    ("/merge", "components-unknown", CHOICE, [], {"components": ["nope"]}),
    ("/merge", "components-empty", r"^Components: pick at least one component", [], {"components": []}),
    ("/merge", "components-none", r"^Components:", [], {"components": None}),
    ("/merge", "fallback-unknown", CHOICE, [], {"fallback": "nope"}),
    ("/merge", "fallback-none", r"^Fallback: fallback must be one of", [], {"fallback": None}),
    ("/merge", "heads-unknown", CHOICE, [], {"heads": "nope"}),
    ("/merge", "heads-none", r"^Heads: heads must be one of", [], {"heads": None}),
    ("/merge", "space-unknown", CHOICE, [], {"space": "nope"}),
    ("/merge", "space-none", r"^Adapter modules: space must be one of", [], {"space": None}),
    ("/merge", "space-module-full-models", r"^Adapter modules: space 'module' needs adapter modules of one kind",
     [], {"space": "module"}),
    ("/curve", "path-unknown", CHOICE, [], {"path": "nope"}),
    ("/curve", "path-none", r"^Path: path must be one of", [], {"path": None}),
    ("/curve", "tasks-unknown", CHOICE, [], {"tasks": ["nope"]}),
    ("/curve", "merges-unknown", CHOICE, [], {"merges": ["nope"]}),
    ("/curve", "merges-with-params", CHOICE, [], {"merges": ["ties:density=nan"]}),
    ("/plane", "task-unknown", CHOICE, [], {"task": "nope"}),
    ("/plane", "task-none", r"^Tasks: pick the task", [], {"task": None}),
    ("/plane", "task-empty", CHOICE, [], {"task": ""}),
    ("/plane", "show-unknown", CHOICE, [], {"show": "nope"}),
    ("/align", "merge_type-unknown", CHOICE, [], {"merge_type": "nope"}),
    ("/align", "merge_type-none", r"^Merge type: merge type must be one of", [], {"merge_type": None}),
    ("/align", "attention-unknown", CHOICE, [], {"attention": "x"}),
    ("/align", "attention-none", r"^Attention matching: attention matching must be one of", [], {"attention": None}),
    ("/align", "residual-unknown", CHOICE, [], {"residual": "x"}),
    ("/align", "residual-none", r"^Residual order from: residual matching must be one of", [], {"residual": None}),
    ("/align", "text-path", r"^Text for activations: unknown task 'passwd'", [], {"text": "/etc/passwd"}),
    ("/align", "text-traversal", r"^Text for activations: unknown task", [], {"text": "../wikitext2"}),
    ("/align", "text-unknown", r"^Text for activations: unknown task 'nope'", [], {"text": "nope"}),
    ("/align", "text-none", r"^Text for activations: text must be a task name", [], {"text": None}),
    ("/align", "text-number", r"^Text for activations: text must be a task name", [], {"text": 3}),
    ("/align", "tasks-unknown", CHOICE, [], {"tasks": ["nope"]}),
    ("/ensemble", "target-unknown", CHOICE, [], {"target": "nope"}),
    ("/ensemble", "target-traversal", CHOICE, [], {"target": "../sst2"}),
    ("/ensemble", "target-none", r"^Target task: pick a target task", [], {"target": None}),
    ("/ensemble", "kind-unknown", CHOICE, [], {"kind": "nope"}),
    ("/ensemble", "kind-none", r"^Module kind: choose one of lora, ia3", [], {"kind": None}),
    ("/ensemble", "similarity-unknown", CHOICE, [], {"similarity": "nope"}),
    ("/ensemble", "similarity-none", r"^Similarity: unknown similarity None", [], {"similarity": None}),
    ("/ensemble", "granularity-unknown", CHOICE, [], {"granularity": "x"}),
    ("/ensemble", "granularity-none", r"^Weights per: choose one of model, layer, block", [], {"granularity": None}),
    ("/ensemble_matrix", "kind-unknown", CHOICE, [], {"kind": "nope"}),
    ("/ensemble_matrix", "kind-none", r"^Module kind: choose one of lora, ia3", [], {"kind": None}),
    ("/ensemble_matrix", "similarity-unknown", CHOICE, [], {"similarity": "x"}),
]
for endpoint, key, expect, marks, override in CHOICES:
    case(endpoint, key, expect, marks=marks, **override)

# -- method parameters -----------------------------------------------------------------------------------

TIES = {"method": "ties", "base": "pico-sst2"}
PARAMS = [  # id, method settings, params, expect
    ("density-nan-string", TIES, {"density": "nan"}, r"^density: parameter 'density' of method 'ties' must be"),
    ("density-nan", TIES, {"density": NAN}, r"^density: .* must be a finite number"),
    ("density-inf", TIES, {"density": INF}, r"^density: .* must be a finite number"),
    ("density-1e400", TIES, {"density": "1e400"}, r"^density: .* must be a finite number"),
    ("density-negative", TIES, {"density": -1}, r"^density: "),
    ("density-1e30", TIES, {"density": 1e30}, r"^density: "),
    ("density-list", TIES, {"density": [0.5]}, r"^density: "),
    ("density-for-average", {}, {"density": 0.2}, r"^density: method 'average' has no parameter 'density'"),
    ("lambda-nan", {"method": "task_arithmetic", "base": "pico-sst2"}, {"lambda": NAN}, r"^lambda: .* finite"),
    ("lambda-1e400-text", {"method": "task_arithmetic", "base": "pico-sst2"}, "lambda=1e400", r"^lambda: .* finite"),
    ("weights-overflow", {}, {"weights": "1e308,1e308"}, r"^weights: .* must have a finite, positive sum"),
    ("weights-overflow-list", {}, {"weights": [1e308, 1e308]}, r"^weights: .* must have a finite, positive sum"),
    ("weights-cancel", {}, {"weights": "3e38,-3e38"}, r"^weights: "),
    ("weights-nan", {}, {"weights": "nan,nan"}, r"^weights: .* must be a finite number"),
    ("weights-count", {}, {"weights": "1,2,3"}, r"parameter 'weights' has 3 values for 2 models"),
    ("weights-dict", {}, {"weights": {"a": 1}}, r"^weights: "),
    ("weights-words", {}, {"weights": "a,b"}, r"^weights: "),
    ("unknown-key", {}, {"bogus": 1}, r"^bogus: method 'average' has no parameter 'bogus'"),
    ("dunder-key", {}, {"__class__": "x"}, r"^__class__: method 'average' has no parameter"),
    ("many-keys", {}, {f"k{i}": 1 for i in range(10_000)}, r"^k0: method 'average' has no parameter 'k0'"),
    ("json-list", {}, [1, 2], r"^Parameters: method parameters must be a dict"),
    ("json-list-text", {}, "[1, 2]", r"^Parameters: method parameters must be a dict"),
    ("json-null-text", {}, "null", r"^Parameters: method parameters must be a dict"),
    ("json-number", {}, 3, r"^Parameters: method parameters must be a dict"),
    ("json-bool", {}, True, r"^Parameters: method parameters must be a dict"),
    ("not-json", {}, "not json", r"method parameters: 'not json' is not key=value"),
    ("deep-json", {}, "[" * 100_000, r"method parameters: .* is not key=value"),
    ("huge-text", {}, "x" * 100_000, r"method parameters: .* is not key=value"),
    ("assignment-nan", TIES, "density=nan", r"^density: .* must be a finite number"),
]
for key, settings, params, expect in PARAMS:
    case("/merge", f"params-{key}", expect, **settings, params=params)

# -- seeds ------------------------------------------------------------------------------------------------

SEEDS = [
    ("hundred-thousand", ",".join(map(str, range(100_000))), r"^Seeds: 100000 is more than this app allows \(3\)"),
    ("commas", "0," * 100_000, r"^Seeds: 100000 is more than this app allows \(3\)"),
    ("words", "a,b", r"^Seeds: seeds must be integers"),
    ("empty", "", r"^Seeds: give at least one seed"),
    ("none", None, r"^Seeds: seeds must be integers"),
    ("float", "1e30", r"^Seeds: seeds must be integers"),
    ("nan", "nan", r"^Seeds: seeds must be integers"),
    ("huge", "99999999999999999999999", r"^Seeds: seeds are whole numbers from 0 to 4294967295"),
    ("negative", "-1", r"^Seeds: seeds are whole numbers from 0 to 4294967295"),
    ("list", ["0"], r"^Seeds: seeds must be integers"),
    ("semicolons", "0;1", r"^Seeds: seeds must be integers"),
    ("huge-junk", "x" * 100_000, r"^Seeds: seeds must be integers"),
]
for key, seeds, expect in SEEDS:
    case("/ensemble", f"seeds-{key}", expect, seeds=seeds)

# -- the zoo build: recipes and admin token guesses ---------------------------------------------------------

TOKEN_REFUSED = r"^Admin token: building the zoo needs the admin token"
for key, token in {"empty": "", "guess": "guess", "upper": TOKEN.upper(), "newline": TOKEN + "\n",
                   "nul": TOKEN + "\x00", "prefix": TOKEN[:-1], "space": " " + TOKEN, "huge": "x" * 100_000,
                   "unicode": "tökén", "none": None, "number": 123, "glob": "*"}.items():
    case("/zoo_build", f"token-{key}", TOKEN_REFUSED, token=token)
    case("/zoo_demo", f"token-{key}", TOKEN_REFUSED, token=token)
RECIPES_REFUSED = {"abs": "/etc/passwd", "dotdot": "../../etc/passwd", "unknown": "nope", "suffix": "tiny.yaml",
                   "empty": "", "server-path": "<RECIPES>/tiny.yaml", "file-url": "file:///etc/passwd",
                   "number": 3, "packaged": "default", "glob": "*"}
for key, recipe in RECIPES_REFUSED.items():
    case("/zoo_build", f"recipe-{key}", CHOICE, recipe=recipe)
case("/zoo_build", "recipe-none", r"^Recipe: unknown recipe 'None'", recipe=None)
case("/zoo_build", "recipe-newline", r"^Recipe: Value: tiny x is not in the list", recipe="tiny\nx")
case("/zoo_build", "recipe-guess-token", CHOICE, recipe="/etc/passwd", token="guess")

# -- uploads ------------------------------------------------------------------------------------------------

FILES = r"^Checkpoint files: "
INVALID_TYPE = r"^Invalid file type"
UPLOADS = [  # id, files, expect, marks
    ("garbage-weights", ["garbage/model.safetensors", "pico/config.json"], FILES + "model.safetensors is not a valid"),
    ("pickle-bin", ["pickle/pytorch_model.bin", "pico/config.json"], INVALID_TYPE),
    ("pickle-as-safetensors", ["pickled/model.safetensors", "pico/config.json"], FILES + "model.safetensors is not"),
    ("python", ["code/modeling_evil.py"], INVALID_TYPE),
    ("python-as-config", ["garbage/model.safetensors", "code/config.json"], FILES + "config.json is not valid JSON"),
    ("oversized-total", ["half/model.safetensors", "half/vocab.txt", "pico/config.json"],
     FILES + r"the upload is 1.2 MB, more than the 1.0 MB allowed"),
    ("auto-map", ["garbage/model.safetensors", "automap/config.json"], FILES + "config.json names custom model code"),
    ("binary-config", ["garbage/model.safetensors", "binary/config.json"], FILES + "config.json is not valid JSON"),
    ("list-config", ["garbage/model.safetensors", "list/config.json"], FILES + "config.json must hold a JSON object"),
    ("deep-config", ["garbage/model.safetensors", "deep/config.json"], FILES + "config.json is not valid JSON"),
    ("nan-config", ["garbage/model.safetensors", "nan/config.json"], FILES + "config.json"),
    ("layers-config", ["garbage/model.safetensors", "layers/config.json"], FILES + "config.json"),
    ("header-too-large", ["header/model.safetensors", "pico/config.json"], FILES + "model.safetensors is not a valid"),
    ("header-lies", ["lies/model.safetensors", "pico/config.json"], FILES + "model.safetensors"),
    ("tokenizer-auto-map", ["garbage/model.safetensors", "pico/config.json", "tokmap/tokenizer_config.json"],
     FILES + "(model.safetensors|tokenizer_config.json)"),
    ("binary-vocab", ["garbage/model.safetensors", "pico/config.json", "binary/vocab.txt"],
     FILES + "vocab.txt is not UTF-8 text"),
    ("twice", ["garbage/model.safetensors", "garbage2/model.safetensors", "pico/config.json"],
     FILES + "model.safetensors was uploaded twice"),
    ("adapter", ["garbage/model.safetensors", "pico/config.json", "adapter/adapter_config.json"],
     FILES + "file 'adapter_config.json' is not accepted"),
    ("config-only", ["pico/config.json"], FILES + "model.safetensors is missing"),
    ("nothing", [], FILES + "no files uploaded"),
]
for key, files, expect in UPLOADS:
    case("/upload", key, expect, files=[Upload(f) for f in files])
case("/upload", "files-none", FILES + "no files uploaded", files=None)
case("/upload", "oversized-file", r"^File size exceeded maximum allowed size of 1048576 bytes", raw=True,
     files=[Upload("big/model.safetensors"), Upload("pico/config.json")])
SERVER_FILES = {"server-config": "<HOME>/zoo/pico-sst2/config.json",
                "server-weights": "<HOME>/zoo/pico-sst2/model.safetensors",
                "etc": "/etc/hostname", "traversal": "../../../../etc/passwd"}
for key, path in SERVER_FILES.items():
    case("/upload", f"file-{key}", FILES, raw=True, marks=[PATH_CRASH],
         files=[{"path": path, "orig_name": "config.json", "meta": {"_type": "gradio.FileData"}}])
case("/upload", "file-url", FILES, raw=True, marks=[PATH_CRASH],
     files=[{"path": "config.json", "url": "<HUB>/ssrf/config.json", "orig_name": "config.json",
             "meta": {"_type": "gradio.FileData"}}])
case("/upload", "file-plain-string", FILES, raw=True, marks=[LIST_CRASH], files=["/etc/passwd"])

# -- endpoints without inputs: junk is ignored, and they reveal nothing -----------------------------------------

for endpoint in NO_INPUTS:
    case(endpoint, "junk", None, raw=True, junk=["/etc/passwd", NAN, "x" * 10_000, {"a": [1]}])


# ----------------------------------------------------------------------------------------------------
# the app, the hub stand-in, the log


class StandIn(BaseHTTPRequestHandler):
    """A hub on 127.0.0.1 that answers 404 to everything and records every request."""

    seen: ClassVar[list[str]] = []

    def _any(self) -> None:
        StandIn.seen.append(f"{self.command} {self.path}")
        body = b'{"error": "stand-in hub"}'
        self.send_response(404)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = do_POST = do_PUT = _any

    def log_message(self, *args) -> None:  # quiet
        pass


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


LOGGERS = ("", "gradio", "uvicorn", "uvicorn.error", "uvicorn.access", "asyncio", "httpx", "huggingface_hub",
           "transformers")


# -- sweeps: the space, the search, the counts, and the sweep a result is written from ---------------------

case("/sweep", "models-huge-count", r"^Checkpoints: 100000 is more than this app allows \(6\)",
     models=["pico-sst2"] * 100_000)
for key, space, expect in (
        ("inverted", "density=0.9:0.1:3", r"the range \[0.9, 0.1\] is empty or inverted"),
        ("unknown", "temperature=0:1:3", r"has no parameter 'temperature' to vary"),
        ("traversal", "../../etc=0:1:3", r"has no parameter '../../etc' to vary"),
        ("huge", "x" * 100_000, r"has no parameter 'x+' to vary"),
        ("nul", "lambda=0\x00:1:3", r"must be a float"),
        ("out-of-bounds", "density=0:9:3", r"must be in \[0.0, 1.0\]"),
        ("one-point", "density=0:1:1", r"at least 2 points"),
        ("empty", "", r"nothing varies"),
        ("too-many-trials", "lambda=0:1:6\ndensity=0:1:6", r"36 trials is more than this app allows \(25\)")):
    case("/sweep", f"space-{key}", rf"^Space: .*{expect}", space=space)
case("/sweep", "per-layer-grid", r"^λ per layer|^Search: a per-layer search", per_layer=True)
case("/sweep", "random-too-many", r"^Trials: 100 trials is more than this app allows \(25\)", algorithm="random",
     space="lambda=0:1", trials=100)
case("/sweep", "dev-huge", r"^Dev examples: .* is more than this app allows \(8\)", dev_size=10**6)
case("/sweep", "algorithm-unknown", CHOICE, algorithm="../grid")
case("/sweep", "method-unknown", CHOICE, method="nope")
case("/sweep_materialize", "name-empty", r"^Sweep: run a sweep first", name="")
for key, name in (("traversal", "../zoo"), ("abs", "/etc"), ("nul", "a\x00b"), ("missing", "ties-0123456789")):
    case("/sweep_materialize", f"name-{key}", r"^Sweep: no sweep named .* here", name=name)
for key in ("abs", "dotdot-zoo", "nested", "huge", "nul"):
    case("/sweep_materialize", f"out-{key}", r"^Output name: output name .* must be a plain name", out=OUTS[key])


@dataclass
class Hostile:
    client: Any
    url: str
    home: Path
    hub: str
    recipes: Path
    files: Path
    basetemp: Path
    params: dict[str, list[str]]
    log: Collect
    outputs: dict[str, str] = field(default_factory=dict)  # case id -> what the server printed meanwhile


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, pico):
    from huggingface_hub import constants  # read with the environment on import, so patched too

    import merging_core as ml
    from views import build_app, launch_kwargs

    from .conftest import copy_model

    server = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    hub = f"http://127.0.0.1:{server.server_address[1]}"
    log = Collect()
    with contextlib.ExitStack() as stack, pytest.MonkeyPatch.context() as mp:
        stack.callback(server.server_close)
        stack.callback(server.shutdown)
        home = tmp_path_factory.mktemp("hostile-home")
        mp.setenv("MERGELAB_HOME", str(home))
        mp.setenv("MERGELAB_PUBLIC", "1")
        mp.setenv("MERGELAB_ADMIN_TOKEN", TOKEN)
        mp.delenv("MERGELAB_HUB_ALLOW", raising=False)
        mp.delenv("SPACE_ID", raising=False)
        for name, value in LIMITS.items():
            mp.setenv(f"MERGELAB_MAX_{name}", str(value))
        # the hub is a stand-in, and offline mode is off: a hub request would really be made, and seen
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
            mp.delenv(name, raising=False)
        mp.setenv("HF_ENDPOINT", hub)
        mp.setenv("HUGGINGFACE_CO_URL_HOME", hub + "/")
        mp.setattr(constants, "HF_HUB_OFFLINE", False)
        mp.setattr(constants, "ENDPOINT", hub)
        mp.setattr(constants, "HUGGINGFACE_CO_URL_HOME", hub + "/")
        mp.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub + "/{repo_id}/resolve/{revision}/{filename}")
        if "datasets" in sys.modules:
            mp.setattr(sys.modules["datasets"].config, "HF_ENDPOINT", hub, raising=False)
            mp.setattr(sys.modules["datasets"].config, "HF_HUB_OFFLINE", False, raising=False)
        _check_the_stand_in_sees_hub_requests(hub)

        for name, task, seed in (("pico-sst2", "sst2", 0), ("pico-cola", "cola", 1), ("pico-mrpc", "mrpc", 2)):
            entry = copy_model(pico(task, seed=seed), home / "zoo" / name)
            (entry / "mergelab.json").write_text(json.dumps({"task": task, "kind": "full", "seed": seed, "steps": 0}))
        recipes = tmp_path_factory.mktemp("hostile-recipes")
        (recipes / "tiny.yaml").write_text("defaults: {base: pico-sst2, steps: 2}\n"
                                           "models:\n  stsb-tiny: {task: stsb}\n")
        mp.setattr(ml.zoo, "RECIPES", recipes)
        files = _hostile_files(tmp_path_factory.mktemp("hostile-files"), home / "zoo" / "pico-sst2")

        # NaN and infinity go out as JSON's NaN and Infinity (httpx refuses them; a raw request need not)
        import httpx._content

        dumps = httpx._content.json_dumps
        mp.setattr(httpx._content, "json_dumps", lambda *a, **k: dumps(*a, **{**k, "allow_nan": True}))

        for name in LOGGERS:
            logging.getLogger(name).addHandler(log)
        demo = build_app()
        try:
            _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, **launch_kwargs())
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # analytics off: the client's own telemetry would otherwise call the (stand-in) hub
                client = gradio_client.Client(url, verbose=False, analytics_enabled=False)
            api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
            params = {name: [p["parameter_name"] for p in e["parameters"]] for name, e in api.items()}
            yield Hostile(client, url, home, hub, recipes, files, home.parent, params, log)
        finally:
            demo.close()
            for name in LOGGERS:
                logging.getLogger(name).removeHandler(log)


def _check_the_stand_in_sees_hub_requests(hub: str) -> None:
    """The stand-in is where a hub request would go: prove it once, then forget the request."""
    from huggingface_hub import hf_hub_download

    with tempfile.TemporaryDirectory(prefix="hostile-hub-cache-") as cache, contextlib.suppress(Exception):
        hf_hub_download("org/model", "config.json", cache_dir=cache)
    assert StandIn.seen, f"huggingface_hub did not call the stand-in hub at {hub}; the no-hub check would be void"
    StandIn.seen.clear()


def _hostile_files(root: Path, pico: Path) -> Path:
    def put(path: str, content: bytes | str) -> None:
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content.encode() if isinstance(content, str) else content)

    config = json.loads((pico / "config.json").read_text())
    put("pico/config.json", json.dumps(config))
    put("garbage/model.safetensors", b"\x00\xffgarbage" * 64)
    put("garbage2/model.safetensors", b"\x01\xfegarbage" * 64)
    put("pickle/pytorch_model.bin", pickle.dumps({"weight": [1.0, 2.0]}))
    put("pickled/model.safetensors", pickle.dumps({"weight": [1.0, 2.0]}))
    put("code/modeling_evil.py", f"open('/tmp/{TAG}', 'w').write('owned')\n")
    put("code/config.json", f"import os\nos.system('touch /tmp/{TAG}')\n")
    put("big/model.safetensors", b"\x00" * (2 * 2**20))
    put("half/model.safetensors", b"\x00" * (6 * 2**20 // 10))
    put("half/vocab.txt", "a\n" * (3 * 2**20 // 10))
    put("automap/config.json", json.dumps({**config, "auto_map": {"AutoModel": "evil.Model"}}))
    put("binary/config.json", b"\xff\xfe\x00garbage")
    put("binary/vocab.txt", b"\xff\xfe\x00garbage")
    put("list/config.json", "[1, 2]")
    put("deep/config.json", '{"a":' * 100_000 + "1" + "}" * 100_000)
    put("nan/config.json", json.dumps({**config, "vocab_size": NAN, "hidden_size": INF}))
    put("layers/config.json", json.dumps({**config, "num_hidden_layers": 10**8}))
    put("header/model.safetensors", struct.pack("<Q", 2**63) + b"{}")
    header = json.dumps({"weight": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 4 * 10**12]}}).encode()
    put("lies/model.safetensors", struct.pack("<Q", len(header)) + header + b"\x00" * 16)
    put("tokmap/tokenizer_config.json", json.dumps({"auto_map": {"AutoTokenizer": ["evil.Tok", None]}}))
    put("adapter/adapter_config.json", "{}")
    return root


# ----------------------------------------------------------------------------------------------------
# checks


def _fill(value: Any, ctx: Hostile, raw: bool = False) -> Any:
    """The case's value with the server's folders filled in, and test files as uploads (`raw`: uploaded
    here, over plain HTTP, so that the server's own size check answers, not the client's)."""
    if isinstance(value, Upload):
        if raw:
            return _upload(ctx, ctx.files / value.path)
        return gradio_client.handle_file(str(ctx.files / value.path))
    if isinstance(value, str):
        return (value.replace("<HOME>", str(ctx.home)).replace("<RECIPES>", str(ctx.recipes))
                .replace("<HUB>", ctx.hub))
    if isinstance(value, list):
        return [_fill(v, ctx, raw) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, ctx, raw) for k, v in value.items()}
    return value


def _upload(ctx: Hostile, path: Path) -> dict:
    import httpx

    with path.open("rb") as f:
        answer = httpx.post(f"{ctx.url}gradio_api/upload", files=[("files", (path.name, f))], timeout=60)
    if answer.status_code != 200:
        raise AppError(answer.text)
    [where] = answer.json()
    return {"path": where, "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in [str(k), *_strings(v)]]
    return []


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under the home but the session folders and caches, with its size and modification time."""
    out = {}
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if rel.parts[0] in ("sessions", "cache"):
            continue
        stat = path.lstat()
        out[str(rel)] = (stat.st_size if path.is_file() else -1, stat.st_mtime_ns)
    return out


def _outside(ctx: Hostile) -> set[str]:
    """What exists where a hostile path points outside the home: /tmp, beside the home, the user's home, the repo."""
    found = {str(p) for p in Path(tempfile.gettempdir()).glob("mergelab-hostile-*")}
    found |= {str(p) for p in Path("/tmp").glob("mergelab-hostile-*")}
    found |= {f"basetemp/{p.name}" for p in ctx.basetemp.iterdir()}
    found |= {str(p) for p in Path.home().glob(f"{TAG}*")}
    found |= {str(p) for p in REPO.glob("*hostile*")} | {str(p) for p in REPO.glob("planted")}
    return found


def _sessions_only(home: Path) -> None:
    """Under sessions/: one folder per session, named by a hash, nothing else."""
    sessions = home / "sessions"
    for path in sessions.iterdir() if sessions.is_dir() else []:
        assert path.is_dir() and re.fullmatch(r"[0-9a-f]{32}", path.name), f"unexpected {path} in sessions/"
        assert not path.is_symlink()


def _server_paths(ctx: Hostile) -> list[str]:
    paths = {str(ctx.home), str(ctx.home.resolve()), str(ctx.basetemp), str(ctx.recipes), str(ctx.files), str(REPO),
             sys.prefix, os.path.realpath(sys.prefix), os.path.join(tempfile.gettempdir(), "gradio")}
    return sorted(p for p in paths if p and p != "/")


def _tracebacks(text: str) -> list[str]:
    """The tracebacks in `text` but Gradio's own printed refusals (a gr.Error raised by a component's
    preprocess, a one-line message to the visitor, which Gradio prints all the same)."""
    found = []
    for block in text.split("Traceback (most recent call last):")[1:]:
        lines = [line for line in block.splitlines() if line.strip()]
        exception = next((line for line in lines if not line.startswith((" ", "\t"))), "")
        if exception.startswith("gradio.exceptions.Error:") and "/gradio/components/" in block:
            continue
        found.append(exception or block[:200])
    return found


def _raw(ctx: Hostile, endpoint: str, kwargs: dict) -> Any:
    """POST to /gradio_api/call/<name> and read its event stream; an error event raises AppError."""
    import httpx

    name = endpoint[1:]
    data = kwargs.get("junk") if "junk" in kwargs else [kwargs[p] for p in ctx.params[endpoint]]
    body = json.dumps({"data": data}, allow_nan=True)
    posted = httpx.post(f"{ctx.url}gradio_api/call/{name}", content=body,
                        headers={"content-type": "application/json"}, timeout=60)
    posted.raise_for_status()
    stream = httpx.get(f"{ctx.url}gradio_api/call/{name}/{posted.json()['event_id']}", timeout=60).text
    events = re.findall(r"^event: (\w+)\ndata: (.*)$", stream, flags=re.MULTILINE)
    kind, payload = events[-1]
    if kind == "error":
        message = (json.loads(payload) or {}).get("error") if payload.strip() not in ("", "null") else None
        raise AppError(message or f"{GENERIC} but has not enabled verbose error reporting.")
    return json.loads(payload)


def _call(ctx: Hostile, item: Case) -> Any:
    if item.raw:
        return _raw(ctx, item.endpoint, _fill(item.kwargs, ctx, raw=True))
    return ctx.client.predict(**_fill(item.kwargs, ctx), api_name=item.endpoint)


@pytest.mark.parametrize("item", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_hostile_input_is_refused_in_one_line_and_leaves_no_trace(item: Case, hostile: Hostile, capfd):
    StandIn.seen.clear()
    tree, outside, logged = _tree(hostile.home), _outside(hostile), len(hostile.log.records)
    capfd.readouterr()
    error = None
    try:
        result = _call(hostile, item)
    except AppError as exc:
        error = exc
    printed = "".join(capfd.readouterr())
    records = hostile.log.records[logged:]
    printed += "".join(logging.Formatter().format(r) + "\n" for r in records
                       if r.exc_info or r.levelno >= logging.ERROR)
    hostile.outputs[item.id] = printed
    message = "" if error is None else str(error)

    # safety first: in every case, expected failures included
    assert _tree(hostile.home) == tree, "a file was written or changed outside the session folders"
    assert _outside(hostile) == outside, "a file appeared outside the home"
    _sessions_only(hostile.home)
    assert StandIn.seen == [], f"a request reached the (stand-in) hub: {StandIn.seen[:3]}"
    inputs = _strings(_fill(item.kwargs, hostile))
    leaked = [p for p in _server_paths(hostile) if p in message and not any(p in s for s in inputs)]
    assert not leaked, f"server path {leaked[0]!r} in {message[:300]!r}"

    if item.endpoint in NO_INPUTS:  # the junk is ignored
        assert error is None, f"{item.endpoint} failed: {message[:300]!r}"
        shown = json.dumps(result)
        assert not [p for p in _server_paths(hostile) if p in shown], f"server path in {shown[:300]!r}"
    else:
        if error is None:
            raise Unfriendly(f"accepted: {str(result)[:200]!r}")
        if GENERIC in message:
            raise Unfriendly(f"the generic error (a crash, not a refusal): {printed.strip()[-300:]!r}")
        if len(message.splitlines()) != 1:
            raise Unfriendly(f"not one line: {message[:300]!r}")
        if len(message) > MAX_MESSAGE:
            raise Unfriendly(f"{len(message)} characters: {message[:200]!r}…")
        if not re.search(item.expect, message, flags=re.DOTALL):
            raise Unfriendly(f"{message[:300]!r} does not match {item.expect!r}")
    found = _tracebacks(printed)
    if found:
        raise Unfriendly(f"traceback in the server's output: {found[0][:300]}")


def test_every_named_endpoint_is_covered(hostile: Hostile):
    """Every public endpoint has cases, and every case names only the endpoint's own parameters."""
    covered = {c.endpoint for c in CASES}
    assert set(hostile.params) <= covered, f"endpoints without cases: {sorted(set(hostile.params) - covered)}"
    for c in CASES:
        if c.endpoint not in NO_INPUTS:
            assert list(c.kwargs) == hostile.params[c.endpoint], f"{c.id}: parameters of {c.endpoint} changed"
    assert len(CASES) >= 150


def test_no_traceback_but_the_expected_failures(hostile: Hostile, capfd):
    """Over the whole module: the server printed or logged a traceback only for the cases marked as
    expected failures (Gradio's own crashes)."""
    expected = {c.id for c in CASES if any(m.name == "xfail" for m in c.marks)}
    stray = {case_id: found for case_id, printed in hostile.outputs.items()
             if case_id not in expected and (found := _tracebacks(printed))}
    late = _tracebacks("".join(capfd.readouterr()))
    assert not stray and not late, f"tracebacks: {dict(list(stray.items())[:3])} {late[:1]}"
