"""One alignment request as a value: `AlignSpec`.

Every front end describes an alignment the same way (the CLI's flags, the Permute tab's controls, the
Python API's keywords all become one `AlignSpec`), its choices are checked when it is made, and the
written alignment records it (`to_dict`), so a run can be re-created with `AlignSpec.from_dict`.
Where B permuted is written (`out`, `overwrite`) is not part of the request: see `align`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from ..errors import MergeLabError
from ..tasks import get_task, split_names
from .match import check_settings

METHODS = ("permute", "zip")  # B permuted into A's basis; or A and B zipped into one model (merge/unmerge matrices)


def _whole(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise MergeLabError(f"{name} must be a whole number, got {value!r}", param=name)
    if value < 1:
        raise MergeLabError(f"{name} must be at least 1, got {value}", param=name)


@dataclass(frozen=True)
class AlignSpec:
    """Align model `b` to model `a` (see `merging_core.align`): what is permuted (`merge_type`), how the
    attention and residual sites are matched, whether Q and K get their own order (`qk`), and which text
    the activations come from (`examples` inputs of task `text`'s `split`, read `batch_size` at a time;
    `tokens` > 0: only the first `tokens` non-padding tokens of them, the data amount of Verma & Elbayad's
    ablation, Sec. 6). `method`: `permute` writes B permuted into A's basis; `zip` writes the ZipIt merge
    of A and B from merge/unmerge matrices (`merging_core.align.zip`), in which up to a share `zip_same` of
    each model's feed-forward and residual features may be zipped with a feature of the same model."""

    a: str  # the reference basis
    b: str  # the model that is permuted into A's basis
    merge_type: str = "ff+attn"
    attention: str = "head-perm"
    residual: str = "first"
    qk: bool = False
    text: str = "wikitext2"
    split: str = "train"
    examples: int = 256
    batch_size: int = 16
    tokens: int = 0  # 0: every token of the examples
    method: str = "permute"
    zip_same: float = 0.0

    def __post_init__(self):
        for name, what in (("a", "A (the reference basis)"), ("b", "B (the model to permute)")):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                object.__setattr__(self, name, os.fspath(value))  # a path is kept as its text (JSON-safe)
            elif not isinstance(value, str) or not value.strip():
                raise MergeLabError(f"pick two checkpoints: {what} is missing", param=name)
        check_settings(self.merge_type, self.attention, self.residual)
        if not isinstance(self.qk, bool):
            raise MergeLabError(f"qk must be true or false, got {self.qk!r}", param="qk")
        if not isinstance(self.text, str):
            raise MergeLabError(f"text must be a task name, got {self.text!r}", param="text")
        try:
            task = get_task(self.text)
        except MergeLabError as exc:
            raise MergeLabError(exc.message, param="text", hint=exc.hint) from None
        if self.split != "validation" and self.split not in split_names(task):
            raise MergeLabError(f"task {task.name} has no split {self.split!r}; choose one of "
                                f"{', '.join(split_names(task))}", param="split")
        _whole(self.examples, "examples")
        _whole(self.batch_size, "batch_size")
        if isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or self.tokens < 0:
            raise MergeLabError(f"tokens must be a whole number, 0 (all) or more, got {self.tokens!r}", param="tokens")
        if self.method not in METHODS:
            raise MergeLabError(f"method must be one of {list(METHODS)}, got {self.method!r}", param="method")
        same = self.zip_same
        if isinstance(same, bool) or not isinstance(same, (int, float)) or not 0.0 <= same <= 1.0:
            raise MergeLabError(f"zip_same must be a share from 0 to 1, got {same!r}", param="zip_same")
        if same and self.method != "zip":
            raise MergeLabError("zip_same applies to method zip only; set method to zip or zip_same to 0",
                                param="zip_same")
        object.__setattr__(self, "zip_same", float(same))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values, every field included."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AlignSpec:
        """The spec `to_dict` wrote (missing options take their defaults; unknown keys are an error)."""
        known = [f.name for f in fields(cls)]
        unknown = [key for key in data if key not in known]
        if unknown:
            raise MergeLabError(f"an alignment spec has no field {unknown[0]!r}; its fields are: {', '.join(known)}",
                                param=unknown[0])
        for name in ("a", "b"):
            if name not in data:
                raise MergeLabError(f"an alignment spec needs models a and b; {name!r} is missing", param=name)
        return cls(**data)
