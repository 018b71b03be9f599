"""User-facing errors.

Every problem caused by the user's input (a missing path, an unknown task, a head that does not fit)
is raised as `MergeLabError` with a one-line message that names the input and the fix. The CLI prints
the message and exits with status 2; the app turns it into `gr.Error`. Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations


class MergeLabError(Exception):
    """A bad input, explained in one line (what is wrong, with which input, and how to fix it)."""
