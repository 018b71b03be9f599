"""Input controls whose bad values are one-line errors naming the control.

Gradio checks a control's value before the handler runs (`preprocess`). For values only an API caller can
send (a string or NaN for a number, None for a list, a value outside a dropdown's choices) its own checks
fail with a generic "the app raised an exception", log a traceback, or echo the whole value back (a
100 kB string, a newline that breaks the message into lines). These subclasses turn every such failure
into `gr.Error("<label>: ...")`: one line, the control named, at most a short excerpt of the value.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

SHOWN = 60  # characters of a refused value shown back


def _excerpt(value: Any) -> str:
    text = repr(value)
    return " ".join((text if len(text) <= SHOWN else text[:SHOWN] + "…").split())


class _Guarded:
    """Mixed into a Gradio component: its preprocessing failures become labelled one-line errors."""

    label: str | None

    def preprocess(self, payload: Any) -> Any:
        try:
            return super().preprocess(payload)  # type: ignore[misc]
        except gr.Error as exc:  # Gradio's own message (bounds, choices): keep its gist, on one line
            reason = " ".join(str(exc.message).split())
            if len(reason) > 2 * SHOWN:
                reason = reason[: 2 * SHOWN] + "…"
            raise gr.Error(f"{self.label}: {reason}", print_exception=False) from None
        except (TypeError, ValueError, OverflowError, AttributeError):
            raise gr.Error(f"{self.label}: {_excerpt(payload)} is not a valid value here", print_exception=False
                           ) from None

from gradio.events import Dependency

class Number(_Guarded, gr.Number):
    pass
    from typing import Callable, Literal, Sequence, Any, TYPE_CHECKING
    from gradio.blocks import Block
    if TYPE_CHECKING:
        from gradio.components import Timer
        from gradio.components.base import Component


class Slider(_Guarded, gr.Slider):
    pass
    from typing import Callable, Literal, Sequence, Any, TYPE_CHECKING
    from gradio.blocks import Block
    if TYPE_CHECKING:
        from gradio.components import Timer
        from gradio.components.base import Component


class CheckboxGroup(_Guarded, gr.CheckboxGroup):
    pass
    from typing import Callable, Literal, Sequence, Any, TYPE_CHECKING
    from gradio.blocks import Block
    if TYPE_CHECKING:
        from gradio.components import Timer
        from gradio.components.base import Component


class Dropdown(_Guarded, gr.Dropdown):
    pass
    from typing import Callable, Literal, Sequence, Any, TYPE_CHECKING
    from gradio.blocks import Block
    if TYPE_CHECKING:
        from gradio.components import Timer
        from gradio.components.base import Component


class Radio(_Guarded, gr.Radio):
    pass
    from typing import Callable, Literal, Sequence, Any, TYPE_CHECKING
    from gradio.blocks import Block
    if TYPE_CHECKING:
        from gradio.components import Timer
        from gradio.components.base import Component