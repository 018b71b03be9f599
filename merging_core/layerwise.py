"""A decoder's input Grams one block at a time, so that a 1B-class model's statistics never sit in memory
together.

RegMean's statistic (`stats`, kind `gram`) is G = XᵀX / N for every linear layer. Hooking every layer of
a whole-model forward accumulates all of them at once: for TinyLlama-1.1B that is 22 blocks of ~450 MB
of float64 sums, 10 GB. Here the model runs block by block instead, the way post-training quantizers
calibrate (GPTQ, arXiv:2210.17323, Sec. 4). First the model runs with its blocks replaced by stand-ins
that record every call of the stack (the input hidden states and the arguments the model passes every
block: attention mask, rotary embeddings, positions; a forward may call the stack several times) and
otherwise hand their input on. Then each block runs on every call's hidden states with its own linear
layers hooked, its Grams are handed to the caller (which writes them to disk) and freed, and its outputs
are the next block's inputs. The layers after the stack (the final norm and the head) run last: the
model's own forward again, the last stand-in handing back the stack's output of each call.

The same batches, the same operations in the same order: the Grams equal the whole-model pass's
(tested). Only for families whose blocks are called one after the other with the same arguments
(Llama, Mistral, Qwen2/3, Gemma, GPT-2); the others keep the whole-model pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .arch.decoders import GPT2, LLAMA
from .progress import ProgressFn, track

MODEL_TYPES = GPT2.model_types + LLAMA.model_types

Grams = dict[str, dict[str, torch.Tensor]]


def block_stack(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The model's stack of decoder blocks (Llama's `model.layers`, GPT-2's `transformer.h`), or None where
    the Grams are computed on the whole model."""
    if model.config.model_type not in MODEL_TYPES:
        return None
    base = getattr(model, model.base_model_prefix, model)
    stack = getattr(base, "layers", None) or getattr(base, "h", None)
    return stack if isinstance(stack, torch.nn.ModuleList) and len(stack) else None


def block_grams(stack: torch.nn.ModuleList, modules: dict[str, torch.nn.Module],
                batches: list[dict[str, torch.Tensor]], run: Callable[[dict[str, torch.Tensor]], None],
                accumulate: Callable[[str, torch.Tensor, dict[str, torch.Tensor]], None],
                finish: Callable[[list[str]], Grams], desc: str, progress: ProgressFn | None
                ) -> tuple[list[str], Iterator[Grams]]:
    """The order in which the Grams of `modules` (canonical name -> linear layer) come, and the Grams
    themselves, computed as they are iterated: block by block, then the layers after the stack.
    `run(batch)` is the model's forward on one batch; `accumulate(name, x, batch)` adds one layer input to
    the sums; `finish(names)` turns those layers' sums into Grams (and frees them)."""
    owner = {id(m): i for i, block in enumerate(stack) for m in block.modules()}
    per_block: list[list[str]] = [[] for _ in stack]
    rest = []
    for name, module in modules.items():
        (per_block[owner[id(module)]] if id(module) in owner else rest).append(name)
    order = [name for names in per_block for name in names] + rest
    return order, _blocks(stack, modules, per_block, rest, batches, run, accumulate, finish, desc, progress)


def _blocks(stack, modules, per_block, rest, batches, run, accumulate, finish, desc, progress) -> Iterator[Grams]:
    calls, shape = _stack_calls(stack, batches, run)
    for i, block in track(enumerate(stack), len(stack), desc, progress):
        for call in calls:
            with _hooked(modules, per_block[i], accumulate, batches[call.batch]), torch.inference_mode():
                out = block(call.hidden, *call.args, **call.kwargs)
            call.hidden = out[0] if isinstance(out, tuple) else out
        yield finish(per_block[i])
    if rest:  # the final norm and the head, on the stack's outputs, call by call as the model makes them
        outputs = iter([call.hidden for call in calls])
        with _stand_ins(stack, shape, outputs=outputs):
            for batch in batches:
                with _hooked(modules, rest, accumulate, batch), torch.inference_mode():
                    run(batch)
        yield finish(rest)


@dataclass
class _Call:
    """One call of the stack by the model: the batch it came from, the hidden states (replaced by each
    block's output in turn) and the other arguments every block gets."""

    batch: int
    hidden: torch.Tensor
    args: tuple
    kwargs: dict[str, Any]


def _stack_calls(stack: torch.nn.ModuleList, batches: list[dict[str, torch.Tensor]], run
                 ) -> tuple[list[_Call], Callable[[torch.Tensor], Any]]:
    """Every call the model makes of its stack of blocks, batch by batch (a forward pass may make several:
    rank classification scores a long verbalizer in a pass of its own), with the arguments it passes the
    first block (a key/value cache left out: each block runs once per call, with nothing to cache); and the
    form of a block's output (a tensor, or a tuple that starts with one), found by running the first block
    where it is called."""
    calls: list[_Call] = []
    cache_type = _cache_type()
    first = stack[0]
    state: dict[str, Any] = {"batch": 0, "shape": None}

    def record(hidden: torch.Tensor, args: tuple, kwargs: dict[str, Any]) -> Any:
        out = first(hidden, *args, **kwargs)
        state["shape"] = state["shape"] or _output_shape(out)
        args = tuple(None if isinstance(a, cache_type) else a for a in args)
        kwargs = {k: None if isinstance(v, cache_type) else v for k, v in kwargs.items()}
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        calls.append(_Call(state["batch"], hidden, args, kwargs))
        return out

    with _stand_ins(stack, lambda value: state["shape"](value), first=record):
        for b, batch in enumerate(batches):
            state["batch"] = b
            with torch.inference_mode():
                run(batch)
    return calls, state["shape"]


def _output_shape(out: Any) -> Callable[[torch.Tensor], Any]:
    """A function that dresses a hidden-states tensor as a block's output `out` is dressed."""
    if isinstance(out, tuple):
        return lambda value: (value,) + out[1:]
    return lambda value: value


class _StandIn(torch.nn.Module):
    """Takes a block's place in the stack: the first block's stand-in records the call (`first`), the last
    one hands back the next stored output (`outputs`), the others hand back their input."""

    def __init__(self, shape: Callable[[torch.Tensor], Any], first=None, outputs: Iterator[torch.Tensor] | None = None):
        super().__init__()
        self.shape, self.first, self.outputs = shape, first, outputs

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if self.first is not None:
            return self.first(hidden_states, args, kwargs)
        return self.shape(next(self.outputs) if self.outputs is not None else hidden_states)


class _stand_ins:
    """The stack's blocks replaced by `_StandIn`s while the model runs, and put back after."""

    def __init__(self, stack: torch.nn.ModuleList, shape, first=None, outputs=None):
        self.stack, self.original = stack, list(stack)
        last = len(stack) - 1
        self.replacements = [_StandIn(shape, first if j == 0 else None, outputs if j == last else None)
                             for j in range(len(stack))]

    def __enter__(self):
        for j, stand_in in enumerate(self.replacements):
            self.stack[j] = stand_in
        return self

    def __exit__(self, *exc):
        for j, block in enumerate(self.original):
            self.stack[j] = block


class _hooked:
    """Forward pre-hooks on the named layers, feeding `accumulate` their inputs while a batch runs."""

    def __init__(self, modules, names, accumulate, batch):
        self.targets = [(name, modules[name]) for name in names]
        self.accumulate, self.batch, self.handles = accumulate, batch, []

    def __enter__(self):
        self.handles = [module.register_forward_pre_hook(
            lambda m, args, name=name: self.accumulate(name, args[0], self.batch)) for name, module in self.targets]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def _cache_type() -> type:
    from transformers.cache_utils import Cache  # (transformers is imported lazily across the engine)

    return Cache
