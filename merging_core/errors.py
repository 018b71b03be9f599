"""User-facing errors.

Every problem caused by the user's input (a missing path, an unknown task, a head that does not fit)
is raised as `MergeLabError`: a one-line message saying what is wrong and how to fix it, plus, when one
input is to blame, the name of that input (`param`, the engine's name: "base", "models", "density").
The engine never names a front end's control: the CLI renders `param` as its flag (`--base`,
`--set density=...`), the app as the label of its control ("Base model"). The CLI prints the line and
exits with status 2; the app raises it as `gr.Error`. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Mapping


class MergeLabError(Exception):
    """A bad input, explained in one line: what is wrong, with which input, and how to fix it."""

    def __init__(self, message: str, *, param: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param  # the engine's name of the offending input, if one input is to blame
        self.hint = hint  # how to fix it, when the message does not already say

    def render(self, names: Mapping[str, str] | Callable[[str], str] | None = None) -> str:
        """The one-line text, with `param` named as the caller's user knows it (a flag, a label)."""
        text = self.message + (f"; {self.hint}" if self.hint else "")
        if self.param is None:
            return text
        if callable(names):
            name = names(self.param)
        else:
            name = (names or {}).get(self.param, self.param)
        return f"{name}: {text}" if name else text

    def __str__(self) -> str:
        return self.render()


@contextmanager
def writing(target: object, param: str | None = "out") -> Iterator[None]:
    """Turn an OSError raised while writing `target` (a full disk, a read-only or refused path) into one
    line naming it; the caller's staging removes what was half written."""
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise MergeLabError(f"could not write {target}: {reason}", param=param) from None
