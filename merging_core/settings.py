"""Where MergeLab keeps things and which device it computes on.

- `MERGELAB_HOME` (default `~/.cache/mergelab`): the zoo, tokenization and statistics caches.
- `MERGELAB_DATA` (default `$MERGELAB_HOME/data`): a data root laid out like `shared/data`
  (`glue/<Task>/`, `emotion/`, `conll2003/`, `wikitext-2/`).
- `MERGELAB_DEVICE` (default: `cuda` when available, else `cpu`).
- `HF_HUB_OFFLINE=1` disables every hub fallback up front instead of failing on a connection.
"""

from __future__ import annotations

import os
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


def hub_allowed() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("1", "true", "yes")


def device() -> torch.device:
    """The compute device: `MERGELAB_DEVICE` if set, else the GPU whenever CUDA is present."""
    name = os.environ.get("MERGELAB_DEVICE")
    if name:
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise MergeLabError(f"MERGELAB_DEVICE={name!r} but CUDA is not available; unset it to use the CPU")
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
