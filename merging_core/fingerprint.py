"""Content fingerprints of files: what cache keys are made of.

A cache key built from a file's name, size and mtime goes stale when the file is rewritten with the
same size and its mtime restored (`os.utime`, `cp -p`, `rsync -t`, a checkout). So every key is built
from a SHA-256 of the file's bytes. Hashing a multi-GB checkpoint on every merge would be slow, so the
digest is remembered, with the file's stamp, in a small JSON record: `.mergelab-fingerprint.json`
beside a checkpoint's files (`{file: {size, mtime_ns, ctime_ns, ino, dev, sha256, recorded_ns}}`), or,
for data files (the data root is not ours to write into), a record under the cache. A recorded digest
is used only while the file's stamp is unchanged, and the stamp includes the inode and the change time
(`ctime`), which `os.utime` cannot restore: any rewrite, in place or by rename, is noticed. As git does
for "racily clean" files, a digest recorded within `RACY_NS` of the file's last change is not trusted
(the file may have changed again within the filesystem's clock tick), so it is simply hashed again.

Records are written atomically (a temporary file renamed into place); a folder that refuses the write
(read-only) just goes without one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Iterable

RECORD = ".mergelab-fingerprint.json"
RACY_NS = 2_000_000_000  # a digest recorded less than 2 s after the file's last change is hashed again
_CHUNK = 1 << 20
_MEMORY: dict[str, dict] = {}  # absolute path -> the entry last computed or read in this process


def _stamp(stat: os.stat_result) -> dict:
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns,
            "ino": stat.st_ino, "dev": stat.st_dev}


def _valid(entry: object, stamp: dict) -> bool:
    """A recorded entry describes the file as it is now (and was not recorded racily)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
        return False
    if any(entry.get(k) != v for k, v in stamp.items()):
        return False
    recorded = entry.get("recorded_ns")
    return isinstance(recorded, int) and recorded - stamp["ctime_ns"] >= RACY_NS


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_record(record: Path) -> dict:
    try:
        found = json.loads(record.read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _write_record(record: Path, entries: dict) -> None:
    """Write `entries` to `record` atomically; give up quietly where the folder refuses (read-only)."""
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=record.name + ".", suffix=".tmp", dir=record.parent)
    except OSError:
        return
    try:
        with os.fdopen(handle, "w") as f:
            json.dump(entries, f, indent=1, sort_keys=True)
        os.replace(tmp, record)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def digests(files: Iterable[Path], *, root: Path, record: Path | None = None, remember: bool = True) -> dict[str, str]:
    """{path relative to `root`: sha256 of its bytes} for `files` (each under `root`), from the record when
    it still describes a file, else hashed (and the record updated). `record` defaults to the file
    `RECORD` in `root`; `remember=False` keeps the digests in this process only (small files, cheap to
    hash again, need no record written into somebody's folder)."""
    record = record or Path(root) / RECORD
    stored: dict | None = None
    changed = False
    out: dict[str, str] = {}
    for path in files:
        path = Path(path)
        name = path.relative_to(root).as_posix()
        stamp = _stamp(path.stat())
        key = str(path.resolve())
        entry = _MEMORY.get(key)
        if not _valid(entry, stamp):
            if stored is None:
                stored = _read_record(record) if remember else {}
            entry = stored.get(name)
            if not _valid(entry, stamp):
                now = time.time_ns()
                entry = {**stamp, "sha256": _sha256(path), "recorded_ns": now}
                stored[name] = entry
                changed = True
            _MEMORY[key] = entry
        out[name] = entry["sha256"]
    if changed and remember:
        _write_record(record, stored)
    return out


def digest(path: Path, *, record: Path | None = None, remember: bool = True) -> str:
    """The sha256 of one file's bytes (see `digests`), recorded beside it unless `record` says where."""
    path = Path(path)
    return digests([path], root=path.parent, record=record, remember=remember)[path.name]


def combined(parts: dict[str, str]) -> str:
    """One short fingerprint of named digests (order-independent)."""
    return hashlib.sha256(json.dumps(sorted(parts.items())).encode()).hexdigest()[:16]
