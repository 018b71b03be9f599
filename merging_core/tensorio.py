"""Lazy tensor reading and streaming safetensors writing, one file or many shards.

Data-free merges touch one parameter at a time, and a large parameter one slice at a time. Reading is
positioned reads (`pread`) straight into a fresh buffer, never a memory map: the process holds only the
tensors it is working on, so its resident set does not grow with the checkpoint (a map's pages stay
resident behind the cursor until the kernel needs them back, and count against an address-space
limit). A sharded checkpoint (`model.safetensors.index.json` and the shards it names) is read as one
model, after checking that every shard is there, that every tensor the index names is in its shard,
and that the shards agree on their floating-point dtype.

Writing goes through `StreamingWriter`, which writes a safetensors header up front (shapes and dtypes
are known from the inputs) and then appends each tensor's bytes as they are produced, whole or in flat
slices; `ShardedWriter` spreads the tensors over shards of a given size with the Hugging Face index.
Peak memory is therefore about one slice per input model, however large the checkpoints are.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import re
import shutil
import struct
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator, TypeVar

import torch
from safetensors import SafetensorError, safe_open

from .errors import MergeLabError

DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
SAFETENSORS_DTYPES = {v: k for k, v in DTYPES.items()}
OUTPUT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # what a merge may write
INDEX = "model.safetensors.index.json"  # the Hugging Face index of a sharded checkpoint
SHARD_SIZE = 5 * 10**9  # bytes per output shard by default (as transformers' save_pretrained)
MAX_HEADER = 100 * 2**20  # a header larger than this is garbage, not a model
RELEASE_STEP = 1 << 28  # bytes written between two releases of a streamed output's pages to the page cache


def open_safetensors(path: str | Path, what: str = ""):
    """`safe_open(path)`, or one clear line when the file is not a safetensors file: truncated (its header
    promises more bytes than it has), a header length or header that is garbage, unreadable. `what` says
    whose file it is ("model 'x'", "statistics"), for the message."""
    path = Path(path)
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as exc:
        raise _invalid(path, what, exc) from None


def _invalid(path: Path, what: str, exc: BaseException) -> MergeLabError:
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    owner = f" of {what}" if what else ""
    return MergeLabError(f"{path.name}{owner} (in {path.parent}) is not a valid safetensors file ({reason}); it "
                         "is truncated or corrupt: re-download, re-export or recompute it")


def check_safetensors(files: list[Path], what: str = "") -> None:
    """Fail clearly, before anything is built, when one of `files` is not a readable safetensors file."""
    for f in files:
        with open_safetensors(f, what):
            pass


def memory_bytes() -> int:
    """The memory the page cache can use at most: the machine's, or its container's limit where lower (a
    cgroup's `memory.max`); very large where neither can be read."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        physical = 1 << 62
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return physical
    return min(physical, int(limit)) if limit.isdigit() else physical


def element_size(dtype: torch.dtype) -> int:
    return dtype.itemsize


MAPPED_MIN = 1 << 20  # bytes: a `mapped` read smaller than this is copied (a mapping costs more than the copy)


class SafetensorsFile:
    """One safetensors file: its header parsed and checked up front, each tensor (or a flat slice of one)
    read on demand with a positioned read into a buffer of its own. Safe to read from several threads."""

    def __init__(self, path: str | Path, what: str = ""):
        self.path = Path(path)
        self._fd = -1
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
            size = os.fstat(self._fd).st_size
            head = os.pread(self._fd, 8, 0)
            if len(head) < 8:
                raise ValueError(f"{size} bytes: too short for a header")
            (length,) = struct.unpack("<Q", head)
            if length > min(size - 8, MAX_HEADER):
                raise ValueError(f"header length {length} does not fit the file's {size} bytes")
            header = json.loads(os.pread(self._fd, length, 8))
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
            start = 8 + length
            self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int]] = {}
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                dtype = SAFETENSORS_DTYPES.get(entry.get("dtype"))
                if dtype is None:
                    raise ValueError(f"tensor {name} has dtype {entry.get('dtype')!r}, which MergeLab does not read")
                shape = tuple(int(d) for d in entry["shape"])
                begin, end = (int(v) for v in entry["data_offsets"])
                if end - begin != math.prod(shape) * element_size(dtype) or begin < 0:
                    raise ValueError(f"tensor {name}'s byte range does not match its shape {list(shape)}")
                if start + end > size:
                    raise ValueError(f"tensor {name} ends at byte {start + end} of a {size}-byte file")
                self.entries[name] = (dtype, shape, start + begin)
        except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            self.close()
            raise _invalid(self.path, what, exc) from None

    def keys(self) -> list[str]:
        return list(self.entries)

    def meta(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        dtype, shape, _ = self.entries[key]
        return dtype, shape

    def get(self, key: str, start: int = 0, stop: int | None = None, *, pin: bool = False,
            mapped: bool = False) -> torch.Tensor:
        """Tensor `key`, or (with `start`/`stop`) the flat slice [start, stop) of its elements: read into a
        buffer of its own (page-locked with `pin`), or with `mapped` a view of the file's pages in the page
        cache, copied by nobody (a private mapping: a write to the tensor copies the page, never reaches the
        file; the mapping goes when the tensor does)."""
        dtype, shape, offset = self.entries[key]
        numel = math.prod(shape)
        whole = start == 0 and stop in (None, numel)
        stop = numel if stop is None else stop
        size = element_size(dtype)
        position, length = offset + start * size, (stop - start) * size
        if mapped and length >= MAPPED_MIN and not pin:
            if os.fstat(self._fd).st_size < position + length:  # (a mapping would crash the process instead)
                raise self._truncated(key)
            aligned = position - position % mmap.ALLOCATIONGRANULARITY
            pages = mmap.mmap(self._fd, position + length - aligned, offset=aligned, access=mmap.ACCESS_COPY)
            flat = torch.frombuffer(pages, dtype=dtype, count=stop - start, offset=position - aligned)
            return flat.view(shape) if whole else flat
        buffer = torch.empty(length, dtype=torch.uint8, pin_memory=pin)
        view, done = memoryview(buffer.numpy()), 0
        while done < len(view):
            read = os.preadv(self._fd, [view[done:]], position + done)
            if read <= 0:
                raise self._truncated(key)
            done += read
        flat = buffer.view(dtype)
        return flat.view(shape) if whole else flat

    def _truncated(self, key: str) -> MergeLabError:
        return MergeLabError(f"{self.path} ended while reading {key}; the file changed or is truncated: "
                             "re-download or re-export it")

    def prefetch(self, key: str, start: int = 0, stop: int | None = None) -> None:
        """Bring the flat slice [start, stop) of tensor `key` into the page cache, waiting for the disk but
        copying nothing into this process (the kernel sends the pages to /dev/null): run on a thread ahead
        of the reads, it keeps the disk busy while the CPU merges. (`posix_fadvise` would not wait, and
        reads only the first few hundred KB of a range.) A no-op where `sendfile` cannot do that."""
        position, length = self._span(key, start, stop)
        try:
            with open(os.devnull, "wb") as sink:
                done = 0
                while done < length:
                    sent = os.sendfile(sink.fileno(), self._fd, position + done, length - done)
                    if sent <= 0:
                        break
                    done += sent
        except (OSError, AttributeError):  # (Windows; macOS sends to sockets only): the reads just wait
            pass

    def release(self, key: str, start: int = 0, stop: int | None = None) -> None:
        """Let the page cache drop the flat slice [start, stop) of tensor `key` (`POSIX_FADV_DONTNEED`), for a
        merge that has used it and will not read it again: the pages it reads next take the place of these
        instead of pages it has read ahead or will read a second time. Pages still mapped stay. A no-op
        where the call does not exist (macOS, Windows)."""
        if hasattr(os, "posix_fadvise"):
            with contextlib.suppress(OSError):  # (a hint: a file system that refuses it changes nothing)
                os.posix_fadvise(self._fd, *self._span(key, start, stop), os.POSIX_FADV_DONTNEED)

    def _span(self, key: str, start: int, stop: int | None) -> tuple[int, int]:
        """The file position and byte length of the flat slice [start, stop) of tensor `key`."""
        dtype, shape, offset = self.entries[key]
        stop = math.prod(shape) if stop is None else stop
        return offset + start * element_size(dtype), (stop - start) * element_size(dtype)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()


def read_index(folder: Path, what: str = "") -> tuple[list[Path], dict[str, str]]:
    """The shards a sharded checkpoint's index names, after checking that each is there and holds every
    tensor the index puts in it; one line naming the first problem otherwise."""
    path = folder / INDEX
    owner = f" of {what}" if what else ""
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map is not a map of tensor names to file names")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MergeLabError(f"{INDEX}{owner} (in {folder}) cannot be read ({exc}); re-download or re-export the "
                            "checkpoint") from None
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        if Path(shard).name != shard:
            raise MergeLabError(f"{INDEX}{owner} (in {folder}) names shard {shard!r} outside its folder; "
                                "re-export the checkpoint")
        if not (folder / shard).is_file():
            raise MergeLabError(f"shard {shard}{owner}, named by {INDEX}, is missing from {folder}; download or "
                                "copy every shard the index lists")
    return [folder / s for s in shards], dict(weight_map)


class LazyFiles:
    """The tensors of one or more safetensors files (a model's shards), read on demand."""

    def __init__(self, files: list[Path], what: str = "", weight_map: dict[str, str] | None = None):
        self._files = [SafetensorsFile(f, what) for f in files]
        self._where = {key: f for f in self._files for key in f.keys()}
        if weight_map is not None:
            self._check_index(weight_map, what)
        self._check_dtypes(what)

    def _check_index(self, weight_map: dict[str, str], what: str) -> None:
        owner = f" of {what}" if what else ""
        for tensor, shard in weight_map.items():
            holder = self._where.get(tensor)
            if holder is None or holder.path.name != shard:
                raise MergeLabError(f"{INDEX}{owner} puts tensor {tensor} in {shard}, but that shard does not hold "
                                    "it; the shard is from another export: re-download the checkpoint")

    def _check_dtypes(self, what: str) -> None:
        """Shards written in different floating-point precisions are two exports mixed in one folder."""
        kinds = {}
        for f in self._files:
            floats = {dtype for dtype, _, _ in f.entries.values() if dtype.is_floating_point}
            if len(floats) == 1:
                kinds[f.path.name] = floats.pop()
        names = list(kinds)
        other = next((n for n in names if kinds[n] != kinds[names[0]]), None)
        if other is not None:
            owner = f"{what}: " if what else ""
            raise MergeLabError(f"{owner}shard {names[0]} holds {DTYPES[kinds[names[0]]]} tensors but shard {other} "
                                f"holds {DTYPES[kinds[other]]}; a checkpoint's shards must share one dtype: "
                                "re-download or re-export it")

    def keys(self) -> list[str]:
        return list(self._where)

    def meta(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        return self._where[key].meta(key)

    def numel(self) -> int:
        """The number of values the files hold, from their headers: no tensor is read."""
        return sum(math.prod(self.meta(key)[1]) for key in self._where)

    def get(self, key: str, start: int = 0, stop: int | None = None, *, pin: bool = False,
            mapped: bool = False) -> torch.Tensor:
        return self._where[key].get(key, start, stop, pin=pin, mapped=mapped)

    def prefetch(self, key: str, start: int = 0, stop: int | None = None) -> None:
        self._where[key].prefetch(key, start, stop)

    def release(self, key: str, start: int = 0, stop: int | None = None) -> None:
        self._where[key].release(key, start, stop)


Item = TypeVar("Item")
Loaded = TypeVar("Loaded")


def read_ahead(items: Iterable[Item], load: Callable[[Item], Loaded], depth: int = 1) -> Iterator[tuple[Item, Loaded]]:
    """(item, load(item)) in order, with the next `depth` loads running on a reader thread while the caller
    works on the current one: the disk (or page cache) and the math overlap, and at most `depth` items
    beyond the current one are in memory. Reads release the GIL, and so does torch."""
    items = iter(items)
    with ThreadPoolExecutor(1, thread_name_prefix="mergelab-read") as pool:
        pending: deque = deque()

        def submit() -> None:
            for item in items:  # the next item, if any
                pending.append((item, pool.submit(load, item)))
                return

        for _ in range(depth):
            submit()
        try:
            while pending:
                item, future = pending.popleft()
                loaded = future.result()
                submit()
                yield item, loaded
        finally:
            for _, future in pending:
                future.cancel()


def write_behind(write: Callable[[str, torch.Tensor], None], items: Iterable[tuple[str, torch.Tensor]],
                 depth: int = 1) -> None:
    """`write(name, tensor)` for every item, in order, on a writer thread while the caller computes the
    next items: copying a merge's output into the page cache overlaps its math. At most `depth` items wait
    to be written; the first error is raised here."""
    with ThreadPoolExecutor(1, thread_name_prefix="mergelab-write") as pool:
        pending: deque = deque()
        for name, tensor in items:
            pending.append(pool.submit(write, name, tensor))
            del tensor
            while len(pending) > depth:
                pending.popleft().result()
        while pending:
            pending.popleft().result()


def model_files(folder: Path, what: str = "") -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of a model folder and, when it is sharded, its index's weight map."""
    if (folder / INDEX).is_file():
        return read_index(folder, what)
    return sorted(folder.glob("*.safetensors")), None


class InMemory:
    """The same interface over a state dict already in memory (LoRA folded in, pickle, hub)."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self._state = state

    def keys(self) -> list[str]:
        return list(self._state)

    def meta(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        t = self._state[key]
        return t.dtype, tuple(t.shape)

    def get(self, key: str, start: int = 0, stop: int | None = None, *, pin: bool = False,
            mapped: bool = False) -> torch.Tensor:
        t = self._state[key]
        return t if start == 0 and stop in (None, t.numel()) else t.reshape(-1)[start:stop]

    def prefetch(self, key: str, start: int = 0, stop: int | None = None) -> None:
        """(In memory already.)"""

    def release(self, key: str, start: int = 0, stop: int | None = None) -> None:
        """(Not from a file.)"""


class StreamingWriter:
    """Write a safetensors file tensor by tensor, in the order of `layout`; a tensor may come whole or as
    consecutive flat slices."""

    def __init__(self, path: Path, layout: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None, reserve: int = 0, release: bool = False):
        """`reserve`: bytes kept free in the header for metadata that `set_metadata` fills in at the end.
        `release`: let the page cache drop what is written, once it is on the disk (a merge larger than
        memory: its output's pages would push out inputs it has read ahead)."""
        self.path, self.layout = Path(path), dict(layout)
        self._header: dict[str, dict] = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        for name, (dtype, shape) in self.layout.items():
            size = math.prod(shape) * element_size(dtype)
            self._header[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        encoded = json.dumps(self._header, separators=(",", ":")).encode()
        encoded += b" " * (reserve + -(len(encoded) + reserve) % 8)  # the data must start 8-byte aligned
        self._file: BinaryIO = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(encoded)) + encoded)
        self._header_size = len(encoded)
        self._release = release
        self._marks = [0, 8 + len(encoded)]  # file positions of the last two releases (`_released`)
        self._expected = iter(self.layout.items())
        self._current: tuple[str, torch.dtype, tuple[int, ...]] | None = None
        self._left = 0  # elements of the current tensor still to come

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the whole of tensor `name`, or the next flat slice of it."""
        if self._current is None:
            expected_name, (dtype, shape) = next(self._expected)
            self._current, self._left = (expected_name, dtype, shape), math.prod(shape)
        expected_name, dtype, shape = self._current
        fits = tuple(tensor.shape) == shape if tensor.numel() == math.prod(shape) else (
            tensor.dim() == 1 and tensor.numel() <= self._left)
        if name != expected_name or tensor.dtype != dtype or not fits:
            raise RuntimeError(f"streaming writer expected {expected_name} {dtype} {shape}, got {name} "
                               f"{tensor.dtype} {tuple(tensor.shape)}")
        data = tensor.detach().contiguous().cpu()
        if data.numel():
            self._file.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
            if self._release:
                self._released()
        self._left -= data.numel()
        if self._left == 0:
            self._current = None

    def _released(self) -> None:
        """Every `RELEASE_STEP` bytes: `POSIX_FADV_DONTNEED` over what was written since the release before
        last. The call starts the writing back of dirty pages and drops the clean ones, so each range gets
        it twice: its writeback starts at one release and its pages go at the next."""
        position = self._file.tell()
        if position - self._marks[1] < RELEASE_STEP or not hasattr(os, "posix_fadvise"):
            return
        self._file.flush()
        with contextlib.suppress(OSError):  # (a hint: a file system that refuses it changes nothing)
            os.posix_fadvise(self._file.fileno(), self._marks[0], position - self._marks[0], os.POSIX_FADV_DONTNEED)
        self._marks = [self._marks[1], position]

    def set_metadata(self, metadata: dict[str, str]) -> None:
        """Rewrite the header's metadata in place (it must fit the header's size, `reserve` included)."""
        encoded = json.dumps({**self._header, "__metadata__": metadata}, separators=(",", ":")).encode()
        if len(encoded) > self._header_size:
            raise RuntimeError(f"metadata for {self.path} does not fit the {self._header_size}-byte header")
        self._file.flush()
        os.pwrite(self._file.fileno(), encoded + b" " * (self._header_size - len(encoded)), 8)

    def close(self) -> None:
        unfinished = self._current is not None or next(self._expected, None) is not None
        self._file.close()
        if unfinished:
            raise RuntimeError(f"streaming writer closed before every tensor of {self.path} was written")

    def __enter__(self) -> "StreamingWriter":
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            self.close()
        else:
            self._file.close()


def parse_size(text: str | int) -> int:
    """Bytes from `5GB`, `500MB`, `2GiB`, `1e9` or a plain number of bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).upper() not in units or float(match.group(1)) * units[match.group(2).upper()] < 1:
        raise MergeLabError(f"shard size {text!r} is not a size; write e.g. 5GB, 500MB or 2GiB", param="shard_size")
    return int(float(match.group(1)) * units[match.group(2).upper()])


def shard_names(count: int) -> list[str]:
    """transformers' names: one file `model.safetensors`, or `model-00001-of-00003.safetensors` ..."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _gigabytes(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"


class ShardedWriter:
    """A model's tensors streamed into shards of at most `shard_size` bytes each (a larger tensor gets a
    shard of its own), in layout order, with transformers' index when there is more than one shard. It
    checks before writing anything that the disk has room for all of it."""

    def __init__(self, folder: Path, layout: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                 shard_size: int = SHARD_SIZE, metadata: dict[str, str] | None = None, release: bool = False):
        """`release`: as `StreamingWriter`'s, for every shard."""
        self.folder, self.metadata, self.release = Path(folder), metadata or {"format": "pt"}, release
        sizes = {name: math.prod(shape) * element_size(dtype) for name, (dtype, shape) in layout.items()}
        self.total = sum(sizes.values())
        free = shutil.disk_usage(self.folder).free
        if self.total > free:
            raise MergeLabError(f"the output needs {_gigabytes(self.total)} but its disk has {_gigabytes(free)} "
                                f"free (in {self.folder.parent}); free some space or write it elsewhere", param="out")
        groups: list[dict] = [{}]
        filled = 0
        for name, meta in layout.items():
            if groups[-1] and filled + sizes[name] > shard_size:
                groups.append({})
                filled = 0
            groups[-1][name] = meta
            filled += sizes[name]
        self.files = shard_names(len(groups))
        self._groups = list(zip(self.files, groups))
        self._shard = -1
        self._writer: StreamingWriter | None = None
        self.weight_map = {name: file for file, group in self._groups for name in group}

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append tensor `name` (whole or its next flat slice), opening its shard when it is the first."""
        file = self.weight_map.get(name)
        if self._writer is None or file != self._groups[self._shard][0]:
            if self._writer is not None:
                self._writer.close()
            self._shard += 1
            self._writer = StreamingWriter(self.folder / self._groups[self._shard][0], self._groups[self._shard][1],
                                           self.metadata, release=self.release)
        self._writer.write(name, tensor)

    def close(self) -> None:
        if self._writer is None and not self.weight_map:  # nothing to write: one empty file, as save_file
            self._shard, self._writer = 0, StreamingWriter(self.folder / self.files[0], {}, self.metadata)
        if self._writer is not None:
            self._writer.close()
        if self._shard != len(self._groups) - 1:
            raise RuntimeError(f"sharded writer closed after {self._shard + 1} of {len(self._groups)} shards")
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": self.weight_map}
            (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")

    def __enter__(self) -> "ShardedWriter":
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            self.close()
        elif self._writer is not None:
            self._writer._file.close()
