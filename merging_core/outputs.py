"""Output folders, claimed exclusively and written atomically.

Every result (a merge, a trained model, an aligned copy, a combined module) is written into a hidden
staging folder beside its destination and renamed into place only when complete, so a reader never
sees a half-written folder. The destination name is *claimed* first by creating it (an empty
placeholder, `mkdir` fails if it exists): two writers can never both own a name, and nothing that the
call did not create is ever replaced, unless the caller asked to overwrite. A staging folder is named
after the process that owns it, so one left behind by a killed process is recognised and removed by
`sweep` (the app runs it at start).
"""

from __future__ import annotations

import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import MergeLabError

STAGING = ".staging-"  # marks `.<name>.staging-<pid>-<random>` folders (and files)
NOT_RESULTS = ("data",)  # folders under the MergeLab home the sweep skips


def check_out(out: str | Path, overwrite: bool) -> Path:
    """Fail early (before minutes of work) when `out` is taken and the caller did not ask to overwrite."""
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise MergeLabError(f"output folder {out} already exists; choose a new one, or allow overwriting it",
                            param="out")
    return out


@contextmanager
def staging(out: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """A staging folder to write into; it becomes `out` only when the block succeeds.

    Without `overwrite`, `out` is claimed up front (created empty, exclusively) and the finished folder
    replaces that placeholder in one rename; with `overwrite`, an existing `out` is swapped out and
    removed only after the new one is in place. On any failure the staging folder and the placeholder
    are removed, and nothing else is touched."""
    out = check_out(out, overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        claimed = _claim(out, overwrite)
    except OSError as exc:
        raise MergeLabError(f"cannot create output folder {out}: {exc.strerror or exc}", param="out") from None
    tmp = out.parent / f".{out.name}{STAGING}{os.getpid()}-{secrets.token_hex(4)}"
    try:
        tmp.mkdir(mode=0o755)
        yield tmp
        if claimed:
            os.replace(tmp, out)  # onto our own empty placeholder: atomic
        else:
            old = out.parent / f".{out.name}.replaced-{os.getpid()}-{secrets.token_hex(4)}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if claimed:
            _remove_placeholder(out)
        raise


def _claim(out: Path, overwrite: bool) -> bool:
    """Create `out` as an empty placeholder; True when this call created it."""
    try:
        out.mkdir()
        return True
    except FileExistsError:
        if overwrite and out.is_dir():
            return False
        raise MergeLabError(f"output folder {out} already exists; choose a new one, or allow overwriting it",
                            param="out") from None


def _remove_placeholder(out: Path) -> None:
    try:
        out.rmdir()  # only while empty: never a folder somebody else filled
    except OSError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep(root: Path) -> list[Path]:
    """Remove staging folders (and their empty placeholders) left under `root` by processes that are gone.
    Returns what was removed."""
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        for name in files:
            if _orphan(name):
                (here / name).unlink(missing_ok=True)
                removed.append(here / name)
        keep = []
        for name in dirs:
            if not _orphan(name):
                if STAGING not in name and not (here == root and name in NOT_RESULTS):
                    keep.append(name)
                continue
            shutil.rmtree(here / name, ignore_errors=True)
            removed.append(here / name)
            placeholder = here / name[1:].rsplit(STAGING, 1)[0]
            if placeholder.is_dir() and not any(placeholder.iterdir()):
                _remove_placeholder(placeholder)
                removed.append(placeholder)
        dirs[:] = keep  # never descend into staging folders or the data
    return removed


def staging_file(path: Path) -> Path:
    """A sibling temporary name for writing `path` atomically (write it, then `os.replace`); `sweep`
    removes it if its process dies first."""
    return path.parent / f".{path.name}{STAGING}{os.getpid()}-{secrets.token_hex(4)}"


def _orphan(name: str) -> bool:
    """A staging folder or file whose owning process is gone."""
    if not name.startswith(".") or STAGING not in name:
        return False
    owner = name.rsplit(STAGING, 1)[1].split("-", 1)[0]
    return owner.isdigit() and not _alive(int(owner))
