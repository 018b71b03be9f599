"""Who is asking, and what they may touch.

Local mode (the user's own machine): models and outputs are whatever the user types, folders included,
and requests are unbounded. Public mode (`merging_core.settings.public_mode()`, on for a Hugging Face
Space): every visitor gets a session folder under `$MERGELAB_HOME/sessions`, named by a hash of Gradio's
session id; models are names (zoo entries, `minilm`, allowlisted hub ids, and the session's own results
and uploads, picked as `merges/<name>`, `aligned/<name>`, `uploads/<name>`); outputs are names inside the
session folder, under a disk quota, and deleted when the session has been idle for a day; every count a
request asks for is bounded (`settings.Limits`); nothing shown to the visitor holds a server path.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

import merging_core as ml
from merging_core.outputs import sweep

RESULT_KINDS = ("merges", "aligned", "uploads")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_RESULT = re.compile(rf"({'|'.join(RESULT_KINDS)})/({_NAME.pattern})")
_ABSOLUTE = re.compile(r"(?<![\w.~])/(?:[\w.@+-]+/)+([\w.@+-]*)")
_SWEEP_EVERY = 600.0  # seconds between sweeps of expired sessions
_DOWNLOADS_KEPT = 3600.0  # seconds a response's download folder is kept
_last_sweep = 0.0


@dataclass(frozen=True)
class Session:
    folder: Path | None  # public mode: this visitor's folder; local mode: None
    limits: ml.settings.Limits | None = None

    @property
    def public(self) -> bool:
        return self.folder is not None

    # -- models ------------------------------------------------------------------------------------

    def model(self, name: object, param: str = "models") -> str:
        """The engine spec of a picked model, checked now so that a bad one is named by its own control
        (`param`). Public mode: a session result by its name, else the name as given (the engine accepts
        only names there); local mode: as given. Empty stays empty (the request's own checks say what is
        missing)."""
        if name is not None and not isinstance(name, str):  # an API caller may send anything
            raise ml.MergeLabError(f"pick models by their names, not {type(name).__name__} {name!r:.40}",
                                   param=param)
        name = (name or "").strip()
        match = _RESULT.fullmatch(name)
        if match and (self.results_root / match.group(1) / match.group(2)).is_dir():
            name = str(self.results_root / match.group(1) / match.group(2))
        if name:
            try:
                ml.resolve(name)
            except ml.MergeLabError as exc:
                raise ml.MergeLabError(exc.message, param=param, hint=exc.hint) from None
        return name

    def models(self, names: object, param: str = "models") -> list[str]:
        """`model` for each picked name (an API caller's single name counts as one), within the limit."""
        names = [names] if isinstance(names, str) else list(names or [])
        self.bound("models", sum(1 for n in names if n != "" and n is not None), param)  # before any work
        return [spec for spec in (self.model(n, param) for n in names) if spec]

    @property
    def results_root(self) -> Path:
        """Where results are kept: the session's folder (public mode), or $MERGELAB_HOME (local mode)."""
        return self.folder if self.public else ml.settings.home()

    def results(self) -> list[str]:
        """Results to pick as models (`merges/<name>`, `aligned/<name>`, `uploads/<name>`), newest first:
        the session's own (public mode), or every one under $MERGELAB_HOME (local mode)."""
        found = [p for kind in RESULT_KINDS for p in (self.results_root / kind).glob("*")
                 if p.is_dir() and not p.name.startswith(".") and _NAME.fullmatch(p.name)
                 and (p / "config.json").is_file()]
        found.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        return [f"{p.parent.name}/{p.name}" for p in found]

    # -- outputs -----------------------------------------------------------------------------------

    def output(self, kind: str, name: str | None, default: str) -> Path:
        """Where a new result goes. Public mode: a plain name inside the session folder, within the quota;
        local mode: a name under $MERGELAB_HOME/<kind>, or a full path. Empty: `default`-<timestamp>."""
        text = (name or "").strip()
        root = (self.folder if self.public else ml.settings.home()) / kind
        if self.public:
            if text and not _NAME.fullmatch(text):
                raise ml.MergeLabError(f"output name {text[:80]!r} must be a plain name: letters, digits, '.', '_' "
                                       "and '-', at most 64 characters", param="out")
            self._check_quota()
        elif text:
            path = Path(text).expanduser()
            return path if path.is_absolute() else root / path
        if text:
            return root / text
        stamp = time.strftime("%Y%m%d-%H%M%S")
        folder, n = root / f"{default}-{stamp}", 2
        while folder.exists():  # a fresh default name, never somebody's folder
            folder, n = root / f"{default}-{stamp}-{n}", n + 1
        return folder

    def shown(self, path: Path | str) -> str:
        """How a result is named to its user: `merges/<name>` in public mode, its path locally."""
        path = Path(path)
        if self.public and path.is_relative_to(self.folder):
            return str(path.relative_to(self.folder))
        return str(path)

    def _check_quota(self) -> None:
        used = _size(self.folder) / 2**20
        if used >= self.limits.session_mb:
            raise ml.MergeLabError(f"your results use {used:.0f} MB of the {self.limits.session_mb} MB a session may "
                                   "keep; download what you need and start a new session", param="out")

    def downloads(self) -> Path:
        """A fresh folder for the files of one response to the browser. Earlier ones of the same visitor
        (public mode) or process (local mode) are removed once an hour old, so downloads never pile up,
        and two responses (or two app processes) never empty each other's folder."""
        key = self.folder.name if self.public else f"local-{os.getpid()}"
        root = Path(tempfile.gettempdir()) / "mergelab-downloads" / key
        root.mkdir(parents=True, exist_ok=True)
        now = time.time()
        for old in root.iterdir():
            if now - old.stat().st_mtime > _DOWNLOADS_KEPT:
                shutil.rmtree(old, ignore_errors=True)
        return Path(tempfile.mkdtemp(dir=root))

    # -- bounds ------------------------------------------------------------------------------------

    def bound(self, field: str, value: int | None, param: str) -> int | None:
        """`value` checked against the public limit of `field` (an empty value becomes the limit)."""
        if not self.public:
            return value
        most = getattr(self.limits, field)
        if value is None:
            return most
        if value > most:
            raise ml.MergeLabError(f"{value} is more than this app allows ({most})", param=param)
        return value

    # -- what the visitor sees -----------------------------------------------------------------------

    def result(self, name: str | None, param: str) -> Path:
        """One of this session's results by the name it was shown under (public mode), or a folder
        (local mode)."""
        name = (name or "").strip()
        match = _RESULT.fullmatch(name)
        if not self.public:
            return Path(name)
        if match and (self.folder / match.group(1) / match.group(2)).is_dir():
            return self.folder / match.group(1) / match.group(2)
        raise ml.MergeLabError(f"{name[:80]!r} is not one of your results", param=param)


def redact(text: str) -> str:
    """Public mode: `text` without server paths (a session's folder disappears, leaving its result names;
    other paths shrink to their last part). Local mode: unchanged."""
    if not ml.settings.public_mode():
        return text
    text = re.sub(re.escape(str(ml.settings.sessions_dir())) + r"/[0-9a-f]+/?", "", text)
    for root, label in ((ml.settings.zoo_dir(), "zoo"), (ml.settings.home(), "home")):
        text = text.replace(str(root), label)
    return _ABSOLUTE.sub(lambda m: m.group(1) or "…", text)


def session(request: gr.Request | None) -> Session:
    """The caller's session: public mode gives each Gradio session its own folder."""
    if not ml.settings.public_mode():
        return Session(None)
    key = getattr(request, "session_hash", None) or "anonymous"
    folder = ml.settings.sessions_dir() / hashlib.sha256(key.encode()).hexdigest()[:32]
    folder.mkdir(parents=True, exist_ok=True)
    folder.touch()  # the session is alive: its expiry counts from now
    limits = ml.settings.limits()
    _sweep_expired(limits.session_hours)
    return Session(folder, limits)


def _sweep_expired(hours: int) -> None:
    global _last_sweep
    now = time.time()
    if now - _last_sweep < _SWEEP_EVERY:
        return
    _last_sweep = now
    for folder in ml.settings.sessions_dir().glob("*"):
        if folder.is_dir() and now - folder.stat().st_mtime > hours * 3600:
            shutil.rmtree(folder, ignore_errors=True)


def startup_sweep() -> list[Path]:
    """At start: staging folders of killed writers, and expired sessions."""
    removed = sweep(ml.settings.home())
    if ml.settings.public_mode():
        _sweep_expired(ml.settings.limits().session_hours)
    return removed


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def limits_note() -> str:
    """One line for the header: the active limits (public mode), or nothing."""
    limits = ml.settings.limits()
    if limits is None:
        return ""
    return (f"Public mode: up to {limits.examples} examples per task, {limits.models} models per merge, "
            f"{limits.points} curve points, {limits.grid}×{limits.grid} plane grids, {limits.seeds} seeds, "
            f"{limits.trials} sweep trials; "
            f"your results (≤ {limits.session_mb} MB) are kept {limits.session_hours} h after your last request.")
