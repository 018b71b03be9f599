"""Lazy tensor reading and streaming safetensors writing.

Data-free merges touch one parameter at a time. Reading goes through `safe_open` (memory-mapped), so
a tensor is materialised only when asked for; writing goes through `StreamingWriter`, which writes the
safetensors header up front (shapes and dtypes are known from the inputs) and then appends each
tensor's bytes as it is produced. Peak memory is therefore about one tensor per input model, however
large the checkpoints are.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import SafetensorError, safe_open

from .errors import MergeLabError

DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}
SAFETENSORS_DTYPES = {v: k for k, v in DTYPES.items()}


def open_safetensors(path: str | Path, what: str = ""):
    """`safe_open(path)`, or one clear line when the file is not a safetensors file: truncated (its header
    promises more bytes than it has), a header length or header that is garbage, unreadable. `what` says
    whose file it is ("model 'x'", "statistics"), for the message."""
    path = Path(path)
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        owner = f" of {what}" if what else ""
        raise MergeLabError(f"{path.name}{owner} (in {path.parent}) is not a valid safetensors file ({reason}); it "
                            "is truncated or corrupt: re-download, re-export or recompute it") from None


def check_safetensors(files: list[Path], what: str = "") -> None:
    """Fail clearly, before anything is built, when one of `files` is not a readable safetensors file."""
    for f in files:
        with open_safetensors(f, what):
            pass


class LazyFiles:
    """The tensors of one or more safetensors files, read on demand (mmap)."""

    def __init__(self, files: list[Path], what: str = ""):
        self._handles = [open_safetensors(f, what) for f in files]
        self._where = {key: h for h in self._handles for key in h.keys()}

    def keys(self) -> list[str]:
        return list(self._where)

    def meta(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        view = self._where[key].get_slice(key)
        return SAFETENSORS_DTYPES[view.get_dtype()], tuple(view.get_shape())

    def numel(self) -> int:
        """The number of values the files hold, from their headers: no tensor is read."""
        return sum(math.prod(self.meta(key)[1]) for key in self._where)

    def get(self, key: str) -> torch.Tensor:
        return self._where[key].get_tensor(key)


class InMemory:
    """The same interface over a state dict already in memory (LoRA folded in, pickle, hub)."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self._state = state

    def keys(self) -> list[str]:
        return list(self._state)

    def meta(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        t = self._state[key]
        return t.dtype, tuple(t.shape)

    def get(self, key: str) -> torch.Tensor:
        return self._state[key]


class StreamingWriter:
    """Write a safetensors file tensor by tensor, in the order of `layout`."""

    def __init__(self, path: Path, layout: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path, self.layout = Path(path), dict(layout)
        header: dict[str, dict] = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        for name, (dtype, shape) in self.layout.items():
            size = torch.tensor([], dtype=dtype).element_size()
            for dim in shape:
                size *= dim
            header[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data must start 8-byte aligned
        self._file: BinaryIO = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(encoded)) + encoded)
        self._expected = iter(self.layout.items())

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected_name, (dtype, shape) = next(self._expected)
        if name != expected_name or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise RuntimeError(f"streaming writer expected {expected_name} {dtype} {shape}, got {name} "
                               f"{tensor.dtype} {tuple(tensor.shape)}")
        data = tensor.detach().contiguous().cpu()
        self._file.write(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")

    def close(self) -> None:
        if next(self._expected, None) is not None:
            self._file.close()
            raise RuntimeError(f"streaming writer closed before every tensor of {self.path} was written")
        self._file.close()

    def __enter__(self) -> "StreamingWriter":
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            self.close()
        else:
            self._file.close()
