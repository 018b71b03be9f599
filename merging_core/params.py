"""Typed, bounded parameters, and the one parser of parameter text.

A `Param` is declared once, by the method or the statistic that reads it; the CLI's `--set`, the
Python API and the app's controls are generated from it. Parameter text has one grammar everywhere:
`key=value` items separated by commas or given as separate arguments (`--set density=0.5,scope=tensor`,
`--set density=0.5 --set scope=tensor`, `ties:density=0.5,scope=tensor`); a piece without `=`
continues the previous value, so list values need no quoting (`weights=3,1`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

from .errors import MergeLabError


@dataclass(frozen=True)
class Param:
    """One typed, bounded parameter of a method or a statistic."""

    name: str
    kind: str  # "float" | "int" | "bool" | "choice" | "floats" (a comma list, one value per model)
    default: Any
    doc: str
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()
    # Older spellings of a choice, still read (e.g. a saved merge_config.json with a bool that has since
    # become a choice): ((old text, choice), ...), matched case-insensitively.
    aliases: tuple[tuple[str, str], ...] = ()

    def parse(self, value: Any, owner: str) -> Any:
        """Check and convert a value (given as text or as a Python value); `owner` names its method."""
        where = f"parameter {self.name!r} of {owner}"
        try:
            if self.kind == "bool":
                if isinstance(value, str):
                    if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError(value)
                    return value.lower() in ("true", "1", "yes")
                return bool(value)
            if self.kind == "choice":
                value = dict(self.aliases).get(str(value).lower(), value)
                if str(value) not in self.choices:
                    raise MergeLabError(f"{where} must be one of {list(self.choices)}, got {value!r}",
                                        param=self.name)
                return str(value)
            if self.kind == "floats":
                if value is None or value == "":
                    return None
                items = value.split(",") if isinstance(value, str) else list(value)
                values = [float(v) for v in items]
                for v in values:
                    self._check_range(v, where)
                return values
            number = int(value) if self.kind == "int" else float(value)
            if self.kind == "int" and float(value) != number:
                raise ValueError(value)
        except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf)
            raise MergeLabError(f"{where} must be a {self.kind}, got {value!r}", param=self.name) from None
        self._check_range(number, where)
        return number

    def _check_range(self, number: float, where: str) -> None:
        if not math.isfinite(number):  # NaN and ±inf: never a meaningful setting, and they poison sums
            raise MergeLabError(f"{where} must be a finite number, got {number}", param=self.name)
        if (self.low is not None and number < self.low) or (self.high is not None and number > self.high):
            raise MergeLabError(f"{where} must be in [{self.low}, {self.high}], got {number}", param=self.name)


def parse_assignments(texts: Iterable[str], where: str = "parameters") -> dict[str, str]:
    """`["density=0.5,scope=tensor", "weights=3,1"]` -> {"density": "0.5", "scope": "tensor", "weights": "3,1"}.

    Every key may be given once: a repeated key is an error, never a silent last-one-wins."""
    params: dict[str, str] = {}
    key = None
    for text in texts:
        for piece in str(text).split(","):
            name, eq, value = piece.partition("=")
            if eq:
                key = name.strip()
                if not key:
                    raise MergeLabError(f"{where}: {piece[:80]!r} has no name before '='")
                if key in params:
                    raise MergeLabError(f"{key!r} is given twice ({params[key]!r} and {value.strip()!r}); "
                                        "give each parameter once", param=key)
                params[key] = value.strip()
            elif key is not None and piece.strip():
                params[key] += "," + piece.strip()  # a list value: weights=3,1
            elif piece.strip():
                raise MergeLabError(f"{where}: {piece.strip()[:80]!r} is not key=value (e.g. lambda=0.5)")
        key = None  # a new argument starts with a key
    return params
