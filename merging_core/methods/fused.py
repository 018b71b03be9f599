"""Fused CPU kernels for the elementwise steps of TIES on large merges.

TIES (Yadav et al. 2023, "TIES-Merging: resolving interference when merging models", arXiv:2306.01708,
Algorithm 1) trims each task vector τ_i to the entries above a magnitude threshold, elects a sign
γ = sign(Σ_i τ̂_i) and averages the entries that agree with it. Run eagerly, each of those steps is its own
pass over memory (a subtraction, an absolute value, a comparison, a product by the mask, a sum, a sign,
a clamp, a count, ...: about thirty per slice of the inputs), and on a CPU with few cores that
arithmetic, not the disk, bounds a 7B merge. `torch.compile` (Inductor's C++ backend) turns the same
expression into one loop over the entries.

The kernels run the eager code's float32 operations in the same order, and Inductor compiles without
floating-point contraction (`-ffp-contract=off`), so they return the eager values exactly (the tests
compare them). The model-wide trim also gets a counting pass (`trim_tally`) that proves a guessed
threshold. Compiling takes seconds once per process (Inductor then keeps the code in its on-disk
cache), so the engine asks for the kernels (`wanted`) only on the CPU, for merges of at least
`MIN_VALUES` input values, without an address-space limit, and never when `MERGELAB_FUSED=0`. Where
compiling fails (no C++ compiler), the merge goes on eagerly and says so (`failure`).
"""

from __future__ import annotations

import logging
import os

import torch

try:
    import resource
except ImportError:  # (Windows: no address-space limits to respect)
    resource = None

# The kernels' calls run in C++ (Inductor's C++ wrapper), which lets go of Python's lock while they run:
# the threads that read ahead, prefetch and write go on meanwhile (with the default Python wrapper they
# wait for each kernel call to end).
COMPILE_OPTIONS = {"cpp_wrapper": True}
MIN_VALUES = 1 << 28  # input values (all models): below this an eager TIES takes seconds, less than compiling

_failure: str | None = None  # why compiling failed in this process, once it has
_compiled: dict[str, object] = {}
_loaded = False  # whether a compiled kernel has run in this process (Inductor imported, a kernel traced)


def wanted(device: torch.device, values: int) -> bool:
    """Whether a merge of `values` input values on `device` should use the compiled kernels: not under an
    address-space limit (`ulimit -v`), where the compiler's hundreds of MB of mappings would eat the budget
    the merge was given."""
    return (device.type == "cpu" and values >= MIN_VALUES and _failure is None
            and os.environ.get("MERGELAB_FUSED", "1") != "0"
            and (resource is None or resource.getrlimit(resource.RLIMIT_AS)[0] == resource.RLIM_INFINITY))


def failure() -> str | None:
    """Why the kernels could not be compiled in this process, or None."""
    return _failure


def loaded() -> bool:
    """Whether a compiled kernel has run in this process. The first call of one takes seconds even from
    Inductor's on-disk cache (about 2.5 s importing the compiler, 1.3 s tracing the kernel, on 2 cores of a
    small machine); a merge reads further ahead while it does."""
    return _loaded


def _ties_combine(base: torch.Tensor, tensors: list[torch.Tensor], limits: torch.Tensor, lam: torch.Tensor,
                  fallback: torch.Tensor) -> torch.Tensor:
    """θ_pre + λ · disjoint mean of the trimmed task vectors: the eager `ties_dare.ties` step by step. The
    inputs may be bf16 or fp16 (each value converted to float32 as it is read, as the eager code's reader
    converts it)."""
    base = base.float()
    deltas = []
    for i, t in enumerate(tensors):
        delta = t.float() - base
        deltas.append(delta * (delta.abs() > limits[i]))  # trim: keep |τ| > limit (a product, as eagerly)
    return _disjoint(base, deltas, lam, fallback)


def _disjoint(base: torch.Tensor, deltas: list[torch.Tensor], lam: torch.Tensor, fallback: torch.Tensor
              ) -> torch.Tensor:
    """θ_pre + λ · the mean of the trimmed task vectors' entries that agree with the elected sign."""
    total = deltas[0]
    for delta in deltas[1:]:
        total = total + delta
    elected = torch.where(total == 0, fallback, total.sign())
    agreeing = [delta * elected for delta in deltas]
    count = (agreeing[0] > 0).to(total.dtype)
    kept = agreeing[0].clamp_min(0)
    for delta in agreeing[1:]:
        count = count + (delta > 0).to(total.dtype)
        kept = kept + delta.clamp_min(0)
    return (kept * elected / count.clamp_min(1)) * lam + base.float()


def _band(t: torch.Tensor, base: torch.Tensor, low: torch.Tensor, high: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """How many entries of one slice have |τ| above `high`, and |τ| where it lies in [low, high], −1
    elsewhere (one output: a compiled loop writing a mask and the magnitudes separately is several
    times slower)."""
    magnitude = (t.float() - base.float()).abs()
    return (magnitude > high).sum(), torch.where((magnitude >= low) & (magnitude <= high), magnitude, -1.0)


EXACT_COUNT = 1 << 24  # entries: a float32 sum of 0s and 1s is exact below this (counts in float32: faster)


def _counted(mask: torch.Tensor) -> torch.Tensor:
    """How many entries of `mask` are true, summed in float32 (exact for fewer than `EXACT_COUNT`; a
    vectorized float sum is about a third faster than an integer one)."""
    return mask.to(torch.float32).sum()


def _tie_counts(base: torch.Tensor, tensors: list[torch.Tensor], values: torch.Tensor) -> list[torch.Tensor]:
    """Per model i, how many entries of one slice have |τ_i| above `values[i]`, and how many equal it."""
    base = base.float()
    counts = []
    for i, t in enumerate(tensors):
        magnitude = (t.float() - base).abs()
        counts += [_counted(magnitude > values[i]), _counted(magnitude == values[i])]
    return counts


def _trim_tally(base: torch.Tensor, tensors: list[torch.Tensor], values: torch.Tensor, votes: bool
                ) -> list[torch.Tensor]:
    """Per model i, how many entries of one slice have |τ_i| above `values[i]` and how many equal it, and
    the float64 sum of τ_i where |τ_i| >= values[i]; with `votes`, then the sum of the signs of the trimmed
    task vectors' sum (the eager `_model_thresholds` expressions)."""
    base = base.float()
    tally, total = [], None
    for i, t in enumerate(tensors):
        delta = t.float() - base
        magnitude = delta.abs()
        kept = delta * (magnitude >= values[i])
        tally += [_counted(magnitude > values[i]), _counted(magnitude == values[i]), kept.double().sum()]
        total = kept if total is None else total + kept
    if votes:
        tally.append(total.sign().sum())  # (exact in float32, as the counts)
    return tally


def _kernel(name: str, fn):
    if name not in _compiled:
        _compiled[name] = torch.compile(fn, dynamic=True, options=COMPILE_OPTIONS)
    return _compiled[name]


SMALL = 1 << 16  # values: a smaller tensor or slice runs the kernel's expression eagerly (as fast as a call,
# and no recompiling for small sizes: the compiled code assumes a few thousand values at least)


def _call(name: str, fn, *args):
    """The compiled `fn` on `args` (its expression run eagerly for a tensor under `SMALL` values), or None
    when it cannot be compiled here (then never tried again)."""
    global _failure, _loaded
    if _failure is not None:
        return None
    if args[0].numel() < SMALL:
        return fn(*args)
    try:
        result = _kernel(name, fn)(*args)
        _loaded = True
        return result
    except Exception as error:  # noqa: BLE001 (a missing compiler, an unsupported platform: eager code instead)
        _failure = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:200]
        logging.getLogger(__name__).warning("compiled kernels unavailable, merging eagerly (%s)", _failure)
        return None


def _ties_combine_to(base: torch.Tensor, tensors: list[torch.Tensor], limits: torch.Tensor, lam: torch.Tensor,
                     fallback: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`_ties_combine` rounded to the output's dtype in the same loop (as `.to(dtype)` rounds it after; float32:
    as it is)."""
    return _ties_combine(base, tensors, limits, lam, fallback).to(dtype)


def ties_combine(base: torch.Tensor, tensors: list[torch.Tensor], limits: list[float], lam: float,
                 fallback: float, compiled: bool = True, dtype: torch.dtype = torch.float32
                 ) -> torch.Tensor | None:
    """TIES's merge of one tensor or slice: each task vector trimmed to the entries with |τ_i| > limits[i]
    (−inf: no trim), the sign elected (`fallback` where the sum is 0), the disjoint mean scaled by λ and
    added to the base; in `dtype` (the output's: a bf16 output is written by the loop, half the bytes of
    float32, with no conversion pass after it). Compiled, or the same expression eagerly
    (`compiled=False`); None when compiling failed."""
    shape = base.shape
    args = (base.flatten(), [t.flatten() for t in tensors], torch.tensor(limits, dtype=torch.float32),
            torch.tensor(lam, dtype=torch.float32), torch.tensor(fallback, dtype=torch.float32))
    merged = _call("ties", _ties_combine_to, *args, dtype) if compiled else _ties_combine_to(*args, dtype)
    return None if merged is None else merged.view(shape)


def ties_disjoint(base: torch.Tensor, deltas: torch.Tensor, lam: float, fallback: float) -> torch.Tensor | None:
    """The same from task vectors already trimmed (stacked): the elected sign, the disjoint mean, λ and the
    base. Compiled; None when compiling failed."""
    shape = base.shape
    merged = _call("disjoint", _disjoint, base.flatten(), [d.flatten() for d in deltas],
                   torch.tensor(lam, dtype=torch.float32), torch.tensor(fallback, dtype=torch.float32))
    return None if merged is None else merged.view(shape)


def band(t: torch.Tensor, base: torch.Tensor, low: float, high: float, compiled: bool = True
         ) -> tuple[int, torch.Tensor] | None:
    """For the selection of a tensor's threshold: how many entries of one slice have |τ| above `high`, and
    the values of |τ| that lie in [low, high]. None when compiling failed."""
    args = (t.flatten(), base.flatten(), torch.tensor(low, dtype=torch.float32),
            torch.tensor(high, dtype=torch.float32))
    found = _call("band", _band, *args) if compiled else _band(*args)
    if found is None:
        return None
    count, banded = found
    if banded.device.type != "cpu":
        return int(count), banded[banded >= 0]
    values = banded.numpy()  # NumPy compacts a boolean selection ~10x faster than torch on the CPU
    return int(count), torch.from_numpy(values[values >= 0])


def tie_counts(base: torch.Tensor, tensors: list[torch.Tensor], values: list[float], compiled: bool = True
               ) -> list[tuple[int, int]] | None:
    """Per model i, how many entries of one slice have |τ_i| > values[i] and how many have |τ_i| == values[i]
    (a threshold guessed where bf16 task vectors tie by the thousands: two counts decide it). None when
    compiling failed."""
    sums = _block_sums("tie_counts", _tie_counts, base, tensors, (torch.tensor(values, dtype=torch.float32),),
                       compiled)
    return None if sums is None else [(int(sums[2 * i]), int(sums[2 * i + 1])) for i in range(len(tensors))]


def _block_sums(name: str, fn, base: torch.Tensor, tensors: list[torch.Tensor], extra: tuple, compiled: bool
                ) -> list[float] | None:
    """The scalars `fn(base, tensors, *extra)` returns, each summed over the slice's blocks of fewer than
    `EXACT_COUNT` entries (where the kernels' float32 counts are exact); compiled when asked, None when
    compiling failed."""
    base, tensors = base.flatten(), [t.flatten() for t in tensors]
    sums: list[float] | None = None
    for start in range(0, base.numel() or 1, EXACT_COUNT - 1):
        block = (base[start:start + EXACT_COUNT - 1], [t[start:start + EXACT_COUNT - 1] for t in tensors], *extra)
        found = _call(name, fn, *block) if compiled else fn(*block)
        if found is None:
            return None
        values = [float(f) for f in found]
        sums = values if sums is None else [total + value for total, value in zip(sums, values)]
    return sums


def trim_tally(base: torch.Tensor, tensors: list[torch.Tensor], values: list[float], votes: bool = False,
               compiled: bool = True) -> tuple[list[tuple[int, int, float]], float] | None:
    """For TIES's model-wide trim, from one slice: per model i, (how many entries have |τ_i| > values[i], how
    many have |τ_i| == values[i], the sum of τ_i over |τ_i| >= values[i]), and, with `votes`, the sum of the
    signs of the trimmed task vectors' sum (else 0). None when compiling failed."""
    sums = _block_sums("tally_votes" if votes else "tally", _trim_tally, base, tensors,
                       (torch.tensor(values, dtype=torch.float32), votes), compiled)
    if sums is None:
        return None
    counts = [(int(sums[3 * i]), int(sums[3 * i + 1]), sums[3 * i + 2]) for i in range(len(tensors))]
    return counts, sums[-1] if votes else 0.0
