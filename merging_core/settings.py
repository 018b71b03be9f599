"""Where MergeLab keeps things and which device it computes on.

- `MERGELAB_HOME` (default `~/.cache/mergelab`): the zoo, tokenization and statistics caches.
- `MERGELAB_DATA` (default `$MERGELAB_HOME/data`): a data root laid out like `shared/data`
  (`glue/<Task>/`, `emotion/`, `conll2003/`, `wikitext-2/`).
- `MERGELAB_DEVICE` (default: `cuda` when available, else `cpu`).
- `HF_HUB_OFFLINE=1` disables every hub fallback up front instead of failing on a connection.

Public mode (a Hugging Face Space, where anyone can call every endpoint): on when `SPACE_ID` is set
(Spaces set it) or `MERGELAB_PUBLIC=1`, off with `MERGELAB_PUBLIC=0`. Then models are names, never
paths (zoo entries, `minilm`, the session's own results and uploads, and hub ids listed in
`MERGELAB_HUB_ALLOW`, comma-separated, empty by default); no data comes from the hub; every request is
bounded by `LIMITS`; building the zoo needs `MERGELAB_ADMIN_TOKEN`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from .errors import MergeLabError


def home() -> Path:
    """The MergeLab home folder (created on first use)."""
    path = Path(os.environ.get("MERGELAB_HOME", "~/.cache/mergelab")).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def zoo_dir() -> Path:
    return home() / "zoo"


def zoo_repo() -> str | None:
    """A published zoo on the hub (`MERGELAB_ZOO_REPO`, e.g. "someone/mergelab-demo-zoo"): when set, the app
    downloads the zoo from it instead of training one."""
    return os.environ.get("MERGELAB_ZOO_REPO", "").strip() or None


def provision() -> str:
    """What the app does at start with an empty zoo (`MERGELAB_PROVISION`): "demo" (download the published
    zoo, else build the demo recipe, in the background), or "off". Default: "demo" in public mode, where a
    visitor cannot build, and "off" locally, where the Zoo tab offers the build."""
    value = os.environ.get("MERGELAB_PROVISION", "").strip().lower()
    if value in ("demo", "off"):
        return value
    if value:
        raise MergeLabError(f"MERGELAB_PROVISION={value!r} is not known; use demo or off")
    return "demo" if public_mode() else "off"


def cache_dir(kind: str) -> Path:
    path = home() / "cache" / kind
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_root() -> Path:
    """The data root; a root that was set explicitly but does not exist is an error, not a silent fallback."""
    explicit = os.environ.get("MERGELAB_DATA")
    if explicit:
        root = Path(explicit).expanduser()
        if not root.is_dir():
            raise MergeLabError(
                f"data root MERGELAB_DATA={explicit!r} does not exist; point it at a folder laid out like "
                "shared/data (glue/, emotion/, conll2003/, wikitext-2/) or unset it to use the hub"
            )
        return root
    return home() / "data"


def _flag(name: str) -> bool | None:
    value = os.environ.get(name)
    return None if value is None or value == "" else value.strip().lower() in ("1", "true", "yes", "on")


def public_mode() -> bool:
    """Serving anonymous, untrusted visitors (see the module doc)."""
    explicit = _flag("MERGELAB_PUBLIC")
    return explicit if explicit is not None else bool(os.environ.get("SPACE_ID"))


def hub_allowed() -> bool:
    """Whether anything (data, unlisted models) may come from the hub: never in public mode."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("1", "true", "yes") and not public_mode()


def hub_allowlist() -> frozenset[str]:
    """Hub model ids a public app may load (`MERGELAB_HUB_ALLOW`, comma-separated; empty by default)."""
    return frozenset(s.strip() for s in os.environ.get("MERGELAB_HUB_ALLOW", "").split(",") if s.strip())


def admin_token() -> str | None:
    """The token that unlocks zoo builds in public mode (`MERGELAB_ADMIN_TOKEN`); None: builds are off."""
    return os.environ.get("MERGELAB_ADMIN_TOKEN") or None


def sessions_dir() -> Path:
    """Where a public app keeps each visitor's results (one folder per session)."""
    return home() / "sessions"


@dataclass(frozen=True)
class Limits:
    """Bounds on one public request (each overridable as MERGELAB_MAX_<FIELD>, e.g. MERGELAB_MAX_EXAMPLES)."""

    examples: int = 500  # dev examples scored per task (an empty limit means this many)
    models: int = 6  # checkpoints in one merge or comparison
    points: int = 26  # points on a curve
    grid: int = 9  # grid points per axis of a plane
    bend_steps: int = 300  # Bezier bend training steps
    align_examples: int = 256  # examples whose activations an alignment correlates
    seeds: int = 3  # few-shot seeds of one ensemble request
    shots: int = 64  # few-shot examples
    steps: int = 100  # few-shot tuning steps
    trials: int = 25  # merges one sweep evaluates
    session_mb: int = 2000  # disk a session's results may use
    session_hours: int = 24  # a session's results are deleted this long after its last request
    upload_mb: int = 200  # one uploaded model

    @classmethod
    def from_env(cls) -> "Limits":
        values = {}
        for f in fields(cls):
            text = os.environ.get(f"MERGELAB_MAX_{f.name.upper()}")
            if text:
                try:
                    values[f.name] = max(1, int(text))
                except ValueError:
                    raise MergeLabError(f"MERGELAB_MAX_{f.name.upper()}={text!r} is not a whole number") from None
        return cls(**values)


def limits() -> Limits | None:
    """The bounds of a public request, or None in local mode (the user's own machine: no bounds)."""
    return Limits.from_env() if public_mode() else None


def device() -> torch.device:
    """The compute device: `MERGELAB_DEVICE` if set, else the GPU whenever CUDA is present."""
    name = os.environ.get("MERGELAB_DEVICE")
    if name:
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise MergeLabError(f"MERGELAB_DEVICE={name!r} but CUDA is not available; unset it to use the CPU")
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
