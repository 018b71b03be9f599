"""TIES and DARE: sparsify task vectors before combining them.

- `ties` (Yadav et al. 2023, "TIES-Merging: resolving interference when merging
  models", arXiv:2306.01708, Algorithm 1): trim each task vector to
  its top-`density` entries by magnitude, elect a sign per entry γ = sign(Σ_i τ̂_i), take the mean of
  the surviving entries whose sign agrees with γ (disjoint mean), and θ = θ_pre + λ τ_m.
  - **Trim scope.** `model` ranks magnitudes over the whole model (the paper); `tensor` ranks within
    each tensor, as mergekit's `ties` does (the two agree to float precision).
  - **Trim count.** Exactly k = max(1, ⌊density · n⌋) entries survive, the way mergekit counts; ties at
    the threshold are broken as mergekit's unstable sort breaks them (`tie_break` sort: the same
    entries, found without the sort, `sort_order`), or in index order (index: which lets a tensor too
    large to hold whole stream in slices). The authors' code keeps every entry at least as large as the
    (n − k)-th smallest, i.e. k + 1 entries plus ties: one more entry per ranked set.
  - **Zero sign** (`zero_sign`): where Σ_i τ̂_i is exactly 0 (e.g. +a and −a) the elected sign is
    undefined and decides which entries survive. `total` takes the sign of the grand total of the trimmed
    task vectors over the trim scope (the paper's text, Sec. 3); `majority` the more frequent elected
    sign over the scope (the authors' code, `resolve_zero_signs(..., "majority")`); `plus` takes + (mergekit).
    `auto` is `total` for scope `model` and `plus` for scope `tensor`. The fallback is computed for
    every density, 1 included.
- `dare` (Yu et al. 2024, "Language models are Super Mario", arXiv:2311.03099,
  eq. 2-3): drop each entry of every task
  vector with probability p and rescale the survivors by 1/(1−p); then combine linearly
  (θ_pre + λ Σ τ̃_i) or TIES-style (elected sign, disjoint mean, λ). The drop masks come from a seed.
  mergekit's `dare_linear` differs twice: it draws its own masks, and it rescales each sparsified
  tensor to the L1 norm of the tensor before the drop instead of by 1/(1−p).

Scope `model` finds each model's exact threshold over the whole model in one or two streaming passes (a
radix selection on the magnitudes' bit patterns, `streamed_thresholds`; with compiled kernels, first one
counting pass that proves a bf16-tied value a spread sample guesses, `counted_thresholds`), then merges
slice by slice like an elementwise method: memory does not grow with the model. Scope `tensor` merges one whole tensor at a time;
with `tie_break` index, a tensor too large to hold whole goes slice by slice after a streaming pass over it
for its threshold (`band_select`: one pass after a spread sample places the threshold). On a large CPU
merge the elementwise steps run as compiled loops (`fused`), with the same values.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from typing import Any

import torch

from . import Method, Param, TensorJob, WholeModel, fused, kernel_dtype, register, stack
from .sort_order import sorted_top


def kth_largest(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry of a flat tensor of non-negative floats, exactly.

    A radix select: the bit patterns of non-negative IEEE floats sort like the floats, so a histogram of
    their top 16 bits (one pass) finds the bucket that holds the k-th largest, and a selection runs on
    that bucket only. About twice as fast as `kthvalue` on a whole embedding matrix.
    """
    if magnitude.dtype == torch.float64 or magnitude.numel() < 1 << 16:
        return torch.kthvalue(magnitude, magnitude.numel() - k + 1).values
    values = magnitude.float()  # exact for fp16/bf16, and monotone
    top = values.view(torch.int32) >> 16  # sign bit is 0: buckets 0 .. 32767, ordered like the values
    from_top = torch.bincount(top, minlength=1 << 15).flip(0).cumsum(0)
    j = int(torch.searchsorted(from_top, torch.tensor(k, dtype=from_top.dtype)))
    above = int(from_top[j - 1]) if j else 0  # entries in the buckets above the k-th largest's
    band = values[top == (1 << 15) - 1 - j]
    return torch.kthvalue(band, band.numel() - (k - above) + 1).values.to(magnitude.dtype)


def trim_tensor_(delta: torch.Tensor, density: float, tie_break: str = "sort") -> torch.Tensor:
    """Zero all but the top `density` fraction of one tensor's entries by magnitude (exactly k, at least
    one), in place, as mergekit does.

    The k-th largest magnitude comes from a selection (linear time) instead of mergekit's full sort.
    Zeros tied at the threshold change nothing; of non-zero ties (common in bf16/fp16), `tie_break`
    "sort" keeps those mergekit's sort keeps (`sorted_top`: the same set, without the sort), "index" the
    first in index order.
    """
    if density >= 1:
        return delta
    magnitude = delta.abs().flatten()
    k = max(1, int(density * magnitude.numel()))
    threshold = kth_largest(magnitude, k)
    if threshold == 0:  # the tied entries are zeros: keeping them or not changes nothing
        return delta.mul_((magnitude > 0).view_as(delta))
    if tie_break == "index":
        return trim_slice_(delta, float(threshold), [k - int(torch.count_nonzero(magnitude > threshold))], 0)
    keep = magnitude >= threshold
    # Non-zero ties at the threshold: mergekit's (unstable) sort decides which stay; `sorted_top` gives
    # the set that sort leaves in front without sorting.
    if int(torch.count_nonzero(keep)) > k:
        keep = sorted_top(magnitude, k)
    del magnitude
    return delta.mul_(keep.view_as(delta))


def disjoint_mean_(deltas: torch.Tensor, elected: torch.Tensor) -> torch.Tensor:
    """Mean over models of the non-zero entries whose sign agrees with the elected sign (±1).

    Overwrites `deltas`: with e = ±1, the agreeing entries are those with e·τ > 0 and their sum is
    e · Σ max(e·τ, 0) (a sign flip is exact), so no masked copy of the stack is needed."""
    deltas.mul_(elected)
    count = (deltas > 0).sum(0, dtype=deltas.dtype).clamp_min_(1)  # zeros never agree
    return deltas.clamp_min_(0).sum(0).mul_(elected).div_(count)


def zero_sign_rule(params: dict[str, Any]) -> str:
    """`total`, `majority` or `plus`: the rule `zero_sign` names, with `auto` resolved by the scope."""
    rule = params.get("zero_sign", "auto")
    if rule == "auto":
        return "total" if params.get("scope", "model") == "model" else "plus"
    return rule


def _fallback(total: float, votes: float, rule: str) -> float:
    """The sign for entries whose elected sign is 0; + when the scope's own total (or vote) is 0 too."""
    value = {"total": total, "majority": votes, "plus": 1.0}[rule]
    return -1.0 if value < 0 else 1.0


def _model_thresholds(model: WholeModel, params: dict[str, Any]) -> dict[str, Any]:
    """Scope `model`: per model, the magnitude of its k-th largest task-vector entry over the whole model
    (density < 1), and the zero-sign fallback over the whole trimmed model, all in streaming passes."""
    if params.get("scope", "model") != "model":
        return {}
    rule = zero_sign_rule(params)
    thresholds, total, votes = None, 0.0, 0.0
    counted = counted_thresholds(model, params.get("density", 1.0), rule) if model.stored is not None else None
    if counted is not None:
        thresholds, total, votes = counted
    elif params.get("density", 1.0) < 1:
        thresholds, totals, _ = streamed_thresholds(model, params["density"], model.sample)
        total = sum(totals)
    elif rule == "total":
        for _, _, tensors, base in model.tensors():
            total += sum(float((t - base).double().sum()) for t in tensors)
    if rule == "majority" and counted is None:
        for _, _, tensors, base in model.tensors():
            summed = torch.zeros_like(base)
            for i, t in enumerate(tensors):
                delta = t - base
                summed += delta * (delta.abs() >= thresholds[i]) if thresholds else delta
            votes += float(summed.sign().sum())
    return {"thresholds": thresholds, "zero_sign": _fallback(total, votes, rule)}


def counted_thresholds(model: WholeModel, density: float, rule: str
                       ) -> tuple[list[float] | None, float, float] | None:
    """Scope `model` on a merge with compiled kernels (`WholeModel.stored`): per model, the exact k-th
    largest |τ_i| of the whole model (density < 1; else None), the sum of the entries the trim keeps (the
    rule `total`) and the sum of the elected signs (`majority`), in one compiled pass; None where the
    sample gives no threshold to try, or the pass refutes it (the radix passes decide then).

    bf16 task vectors tie by the millions over a whole model (|τ| is a small multiple of the base weights'
    spacing, and the binades share those values), so the value a spread sample puts at rank k is most of
    the time the k-th largest itself: the pass counts the entries above it and equal to it, which proves
    it, and sums what the zero-sign rule needs at the same time. It goes over the model backwards, so the
    merge after it starts on the pages it read last."""
    if density >= 1 and rule == "plus":
        return None  # nothing to find
    guesses = sampled_guesses(model.sample(), density) if density < 1 else None
    if density < 1 and guesses is None:
        return None
    above: list[int] = []
    tied: list[int] = []
    total = votes = 0.0
    count = 0
    for _, _, tensors, base in model.stored():
        values = guesses or [0.0] * len(tensors)  # (|τ| >= 0: the whole task vector)
        args = (base, tensors, values, rule == "majority")
        counts, signs = fused.trim_tally(*args) or fused.trim_tally(*args, compiled=False)
        above, tied = above or [0] * len(counts), tied or [0] * len(counts)
        for i, (larger, equal, kept) in enumerate(counts):
            above[i], tied[i], total = above[i] + larger, tied[i] + equal, total + kept
        votes += signs
        count += base.numel()
    k = max(1, int(density * count))
    if guesses is not None and not all(a < k <= a + t for a, t in zip(above, tied)):
        return None
    return guesses, total, votes


def sampled_guesses(sample, density: float) -> list[float] | None:
    """Per model, the value a sample of the whole model (`WholeModel.sample`: blocks of every parameter,
    each weighted by its parameter's size) puts at the k-th largest |τ_i|, where that value is tied widely
    enough to be tried as the exact threshold (`_tied_guess`); None when some model has no such value."""
    magnitudes: list[list[torch.Tensor]] = []
    weights: list[torch.Tensor] = []
    count = 0
    for _, size, tensors, base in sample:
        for i, t in enumerate(tensors):
            if len(magnitudes) <= i:
                magnitudes.append([])
            magnitudes[i].append((t.float() - base.float()).abs().flatten())
        weights.append(torch.full((tensors[0].numel(),), size / tensors[0].numel(), dtype=torch.float64))
        count += size
    k = max(1, int(density * count))
    weight = torch.cat(weights)
    guesses = [_tied_guess(torch.cat(m), k, count, weight) for m in magnitudes]
    return None if None in guesses else guesses


WINDOW = 16  # top-16-bit buckets (an eighth of an octave) whose low bits the one-pass selection keeps


def streamed_thresholds(model: WholeModel, density: float, sample=None) -> tuple[list[float], list[float], list[int]]:
    """Per model i, the exact k-th largest |τ_i| entry over the whole model, k = max(1, ⌊density · n⌋),
    the sum of the entries of τ_i at least that large (what the zero-sign rule `total` adds up), and how
    many of the entries equal to it make exactly k with those strictly larger.

    A radix selection in streaming passes, so no magnitude is held beyond the slice being read: the bit
    patterns of non-negative float32 values sort like the values, so a histogram of their top 16 bits
    finds the bucket holding the k-th largest, and a histogram of the low 16 bits of that bucket's entries
    pins its exact bit pattern. With `sample` (`WholeModel.sample`: blocks spread over every parameter) the bucket
    is first estimated, and one pass gathers both histograms, the low bits for a window of `WINDOW`
    buckets around the estimate; a second pass runs only when the bucket falls outside the window.
    Without it, two passes. Sums of τ_i above the bucket (and per low-bits value inside it) give the
    trimmed sum. Memory: 65,536 counters per model (the window: 16 x 65,536, 16 MB), whatever the model's
    size; the result equals `kth_largest` of all magnitudes at once."""
    windows = _estimated_windows(sample(), density) if sample is not None else None
    high: list[torch.Tensor] = []
    low: list[torch.Tensor] = []
    low_sums: list[torch.Tensor] = []
    above: list[float] = []  # per model: the sum of τ_i over the buckets above its window
    count = 0
    for _, _, tensors, base in model.tensors():
        for i, t in enumerate(tensors):
            delta, bits, top = _magnitude_bits(t, base)
            if len(high) <= i:
                high.append(torch.zeros(1 << 15, dtype=torch.int64))
                if windows is not None:
                    low.append(torch.zeros(WINDOW << 16, dtype=torch.int64))
                    low_sums.append(torch.zeros(WINDOW << 16, dtype=torch.float64))
                    above.append(0.0)
            high[i] += torch.bincount(top, minlength=1 << 15).cpu()
            if windows is not None:
                above[i] += float(delta[top >= windows[i] + WINDOW].double().sum())
                inside = (top >= windows[i]) & (top < windows[i] + WINDOW)
                keys = ((top[inside] - windows[i]) << 16) | (bits[inside] & 0xFFFF)
                low[i] += torch.bincount(keys, minlength=WINDOW << 16).cpu()
                low_sums[i] += torch.bincount(keys, weights=delta[inside].double(), minlength=WINDOW << 16).cpu()
        count += base.numel()
    k = max(1, int(density * count))
    buckets, ranks = zip(*(_bucket_of(h, k) for h in high))
    if windows is not None and all(0 <= b - w < WINDOW for b, w in zip(buckets, windows)):
        # the window's buckets above each model's bucket count in full, its own bucket by low bits
        above = [s + float(sums[(b - w + 1) << 16:].sum()) for s, sums, b, w in zip(above, low_sums, buckets, windows)]
        low = [h[(b - w) << 16:(b - w + 1) << 16] for h, b, w in zip(low, buckets, windows)]
        low_sums = [h[(b - w) << 16:(b - w + 1) << 16] for h, b, w in zip(low_sums, buckets, windows)]
    else:  # the second pass: the low bits of the bucket each model's k-th largest is in
        low = [torch.zeros(1 << 16, dtype=torch.int64) for _ in high]
        low_sums = [torch.zeros(1 << 16, dtype=torch.float64) for _ in high]
        above = [0.0 for _ in high]
        for _, _, tensors, base in model.tensors():
            for i, t in enumerate(tensors):
                delta, bits, top = _magnitude_bits(t, base)
                above[i] += float(delta[top > buckets[i]].double().sum())
                inside = top == buckets[i]
                low_bits = bits[inside] & 0xFFFF
                low[i] += torch.bincount(low_bits, minlength=1 << 16).cpu()
                low_sums[i] += torch.bincount(low_bits, weights=delta[inside].double(), minlength=1 << 16).cpu()
    thresholds, totals, tied = [], [], []
    for bucket, rank, h, sums, s, hi in zip(buckets, ranks, low, low_sums, above, high):
        from_top = h.flip(0).cumsum(0)
        j = int(torch.searchsorted(from_top, torch.tensor(rank, dtype=from_top.dtype)))
        lowest = (1 << 16) - 1 - j
        thresholds.append(float(torch.tensor([(bucket << 16) | lowest], dtype=torch.int32).view(torch.float32)))
        totals.append(s + float(sums[lowest:].sum()))
        tied.append(k - int(hi[bucket + 1:].sum()) - (int(from_top[j - 1]) if j else 0))
    return thresholds, totals, tied


def _magnitude_bits(t: torch.Tensor, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A slice's task vector τ (flat), the float32 bit patterns of |τ| (which sort like the magnitudes) and
    their top 16 bits (the bucket of each entry)."""
    delta = (t.float() - base.float()).flatten()
    bits = delta.abs().view(torch.int32)
    return delta, bits, bits >> 16


def _bucket_of(high: torch.Tensor, k: int) -> tuple[int, int]:
    """The top-16-bit bucket that holds the k-th largest entry, and that entry's rank inside it."""
    from_top = high.flip(0).cumsum(0)
    j = int(torch.searchsorted(from_top, torch.tensor(k, dtype=from_top.dtype)))
    return (1 << 15) - 1 - j, k - (int(from_top[j - 1]) if j else 0)


def _estimated_windows(sample, density: float) -> list[int]:
    """Per model, the first bucket of a `WINDOW`-bucket window centred on the bucket estimated to hold its
    k-th largest |τ| entry, from a sample of every parameter (each sample's histogram scaled up to its
    parameter's size)."""
    high: list[torch.Tensor] = []
    count = 0
    for _, size, tensors, base in sample:
        for i, t in enumerate(tensors):
            top = _magnitude_bits(t, base)[2]
            if len(high) <= i:
                high.append(torch.zeros(1 << 15, dtype=torch.float64))
            high[i] += torch.bincount(top, minlength=1 << 15).cpu().double() * (size / t.numel())
        count += size
    k = max(1, int(density * count))
    return [min(max(_bucket_of(h, k)[0] - WINDOW // 2, 0), (1 << 15) - WINDOW) for h in high]


@dataclass
class SliceTrim:
    """Scope `tensor` on a tensor merged slice by slice: per model, its threshold over the whole tensor, how
    many entries equal to it the trim still keeps (the first ones in index order), and, when the scan
    counted them, how many each slice holds. Slices are trimmed in order, once each."""

    thresholds: list[float]
    ties_left: list[int]
    tied: list[list[int]] | None = None  # per model, per slice in order
    slice: int = 0  # the next slice

    def next_limits(self) -> list[float | None]:
        """Per model, the limit of the next slice's trim (keep |τ| > limit), or None where it keeps some
        of the slice's tied entries and drops others (or the scan did not count them): `_slice_ranges`
        then finds where, and counts them down. Moves on to the following slice."""
        limits: list[float | None] = []
        for i, threshold in enumerate(self.thresholds):
            left = self.ties_left[i]
            here = self.tied[i][self.slice] if self.tied is not None else None
            if threshold == 0 or left == 0 or here == 0:  # (tied zeros change nothing)
                limits.append(threshold)
            elif here is not None and left >= here:  # every tied entry of this slice is kept
                limits.append(below(threshold))
                self.ties_left[i] -= here
            else:
                limits.append(None)
        self.slice += 1
        return limits

    def restarted(self) -> SliceTrim:
        """The same trim from the first slice again (for a second pass over the tensor)."""
        return SliceTrim(self.thresholds, list(self.ties_left), self.tied)


@functools.lru_cache(maxsize=1024)
def below(value: float) -> float:
    """The largest float32 below `value`: |τ| > below(t) is |τ| >= t."""
    return float(torch.nextafter(torch.tensor(value), torch.tensor(-math.inf)))


BAND_SIGMAS = 6  # the half-width of the sample's band around the estimated k-th largest, in standard deviations
BAND_CAP = 1 << 23  # values per model: a band holding more than this (a huge tie) leaves it to the radix passes


def _tensor_scan(slices, params: dict[str, Any], sample=None) -> dict[str, Any]:
    """Scope `tensor` on a tensor too large to hold whole, read slice by slice: per model, its exact
    threshold and how many entries equal to it the trim keeps so that exactly k survive (the first ones
    in index order; mergekit's sort keeps an arbitrary subset of such ties), found by `band_select` in
    one pass when `sample` places it, else by `streamed_thresholds` in two; and the zero-sign fallback
    over the trimmed tensor when the rule needs one."""
    context: dict[str, Any] = {"tensor_trim": None, "zero_sign": 1.0}
    if params["density"] < 1:
        trim = band_select(slices, params["density"], sample) if sample is not None else None
        if trim is None:
            as_model = WholeModel([], lambda: ((job.name, job.info, job.tensors, job.base) for job in slices()))
            thresholds, _, tied = streamed_thresholds(as_model, params["density"])
            trim = SliceTrim(thresholds, tied)
        context["tensor_trim"] = trim
    rule = zero_sign_rule(params)
    if rule != "plus":
        total = votes = 0.0
        trim = context["tensor_trim"].restarted() if context["tensor_trim"] else None
        for job in slices():
            summed = _trim_ranges_(task_vectors(job), _slice_ranges(job, trim)).sum(0)
            total, votes = total + float(summed.double().sum()), votes + float(summed.sign().sum())
        context["zero_sign"] = _fallback(total, votes, rule)
    return context


def band_select(slices, density: float, sample) -> SliceTrim | None:
    """Per model, the exact k-th largest |τ| of a large tensor in one pass over its slices, k = max(1,
    ⌊density · n⌋), with how many entries equal to it each slice holds; None where the sample misled.

    A sample-select: `sample()` (a TensorJob of blocks spread over the tensor, and the tensor's size)
    places the k-th largest inside a band of magnitudes [low, high] with high probability; the pass counts
    the entries above the band and keeps the few inside it, and the k-th largest is then found among
    those. It is exact whenever the count above the band is below k and the band reaches k; otherwise
    (or when a huge tie fills the band) it returns None, and the radix passes decide.

    bf16 task vectors tie by the thousands (|τ| is a small multiple of the base weights' spacing), and then
    the value the sample puts at rank k is, most of the time, the k-th largest itself: a first pass only
    counts the entries above it and equal to it, which proves it or not (`tie_select`), at a fraction of
    the band's cost."""
    job, n = sample()
    k = max(1, int(density * n))
    compiled = job.context.get("fused", False)
    magnitudes = [(t.float() - job.base.float()).abs().flatten() for t in job.tensors]
    guesses = [_tied_guess(m, k, n) for m in magnitudes]
    if None not in guesses:
        trim = tie_select(slices, k, guesses, compiled)
        if trim is not None:
            return trim
    bands = [_band_of(m, k, n) for m in magnitudes]
    above = [0] * len(bands)
    inside: list[list[torch.Tensor]] = [[] for _ in bands]
    held = [0] * len(bands)
    for piece in slices():
        for i, (t, (low, high)) in enumerate(zip(piece.tensors, bands)):
            found = fused.band(t, piece.base, low, high) if compiled else None
            count, values = found if found is not None else fused.band(t, piece.base, low, high, False)
            above[i] += count
            inside[i].append(values)
            held[i] += inside[i][-1].numel()
            if held[i] > BAND_CAP:
                return None
    thresholds, tied, tied_left = [], [], []
    for i, parts in enumerate(inside):
        band = torch.cat(parts)
        rank = k - above[i]  # the k-th largest's rank inside the band, from the top
        if not 0 < rank <= band.numel():
            return None
        threshold = torch.kthvalue(band, band.numel() - rank + 1).values
        thresholds.append(float(threshold))
        tied_left.append(k - above[i] - int((band > threshold).sum()))
        tied.append([int((part == threshold).sum()) for part in parts])
    return SliceTrim(thresholds, tied_left, tied)


def tie_select(slices, k: int, guesses: list[float], compiled: bool = False) -> SliceTrim | None:
    """The trim of a large tensor whose k-th largest |τ_i| is `guesses[i]` for every model i, proven in one
    counting pass over its slices (fewer than k entries above the guess, at least k from it up); None
    where a guess is not the k-th largest."""
    above = [0] * len(guesses)
    tied: list[list[int]] = [[] for _ in guesses]
    for piece in slices():
        found = fused.tie_counts(piece.base, piece.tensors, guesses) if compiled else None
        for i, (count, equal) in enumerate(found or fused.tie_counts(piece.base, piece.tensors, guesses, False)):
            above[i] += count
            tied[i].append(equal)
    if not all(a < k <= a + sum(t) for a, t in zip(above, tied)):
        return None
    return SliceTrim(list(guesses), [k - a for a in above], tied)


TIED = 0.002  # the share of the sample a value must hold to be tried as the threshold by counting alone


def _tied_guess(magnitude: torch.Tensor, k: int, n: int, weights: torch.Tensor | None = None) -> float | None:
    """The sample's estimate of the k-th largest of n magnitudes, where the sample holds that value at
    least `TIED` of the time (a tie wide enough to hold the true rank k, most of the time); else None.
    `weights`: how many of the n values each sampled one stands for (summing to n), when not all alike."""
    s = magnitude.numel()
    if weights is None:
        rank = min(max(round(k * s / n), 1), s)  # from the top
        guess = torch.kthvalue(magnitude, s - rank + 1).values
        held = float((magnitude == guess).sum()) / s
    else:
        order = magnitude.argsort(descending=True)
        reached = int(torch.searchsorted(weights[order].cumsum(0), torch.tensor(float(k), dtype=torch.float64)))
        guess = magnitude[order[min(reached, s - 1)]]
        held = float(weights[magnitude == guess].sum()) / n
    return float(guess) if int((magnitude == guess).sum()) >= 16 and held >= TIED else None


def _band_of(magnitude: torch.Tensor, k: int, n: int) -> tuple[float, float]:
    """[low, high]: magnitudes between which a sample of |τ| places the k-th largest of n with high
    probability (the sample's order statistics `BAND_SIGMAS` binomial deviations either side, and a
    margin for the sample's blocks not being independent draws)."""
    s = magnitude.numel()
    expected = k * s / n  # the k-th largest's expected rank in the sample, from the top
    margin = BAND_SIGMAS * math.sqrt(expected * (1 - k / n)) + 0.002 * s + 16
    top, bottom = math.floor(expected - margin), math.ceil(expected + margin)
    high = float(torch.kthvalue(magnitude, s - top + 1).values) if top >= 1 else math.inf
    low = float(torch.kthvalue(magnitude, s - bottom + 1).values) if bottom <= s else 0.0
    return low, high


def _slice_ranges(job: TensorJob, trim: SliceTrim | None) -> list[tuple[int, int, list[float]]]:
    """The next slice's trim as ranges [start, stop) of its flat entries with one plain limit per model
    (keep |τ_i| > limit): the whole slice, or, where a model's kept ties run out inside it, the part up to
    the last tied entry it keeps (a limit just below the threshold) and the part after (the threshold).
    Counts the kept ties down."""
    n = job.base.numel()
    if trim is None:
        return [(0, n, [-math.inf] * len(job.tensors))]
    limits = trim.next_limits()
    cuts: dict[int, int] = {}
    for i, limit in enumerate(limits):
        if limit is None:  # keep the first `left` entries equal to the threshold, in index order
            cuts[i], kept = _tie_cut(job.tensors[i].flatten(), job.base.flatten(), trim.thresholds[i],
                                     trim.ties_left[i])
            trim.ties_left[i] -= kept
    bounds = sorted({0, n, *cuts.values()})
    return [(start, stop, [limit if limit is not None else
                           below(trim.thresholds[i]) if stop <= cuts[i] else trim.thresholds[i]
                           for i, limit in enumerate(limits)])
            for start, stop in itertools.pairwise(bounds)]


TIE_SCAN = 1 << 18  # entries: the block `_tie_cut` looks through at a time


def _tie_cut(t: torch.Tensor, base: torch.Tensor | None, threshold: float, left: int) -> tuple[int, int]:
    """The end of the shortest prefix of a flat slice holding `left` entries with |τ| == threshold (τ = t −
    base, or t itself without a base; all of it when it holds fewer), and how many it holds; looked for
    block by block, as it usually ends early."""
    seen = 0
    for start in range(0, t.numel(), TIE_SCAN):
        block = t[start:start + TIE_SCAN].float()
        tied = (block if base is None else block - base[start:start + TIE_SCAN].float()).abs() == threshold
        here = int(tied.sum())
        if seen + here >= left:
            return start + int(torch.nonzero(tied).flatten()[left - seen - 1]) + 1, left
        seen += here
    return t.numel(), seen


def _trim_ranges_(deltas: torch.Tensor, ranges: list[tuple[int, int, list[float]]]) -> torch.Tensor:
    """Trim one slice's stacked task vectors in place by `_slice_ranges`."""
    flat = deltas.view(len(deltas), -1)
    for start, stop, limits in ranges:
        for d, limit in zip(flat, limits):
            part = d[start:stop]
            part.mul_(part.abs() > limit)
    return deltas


def trim_slice_(delta: torch.Tensor, threshold: float, ties_left: list[int], i: int) -> torch.Tensor:
    """Keep the entries of one slice of model i's task vector above `threshold`, and the first
    `ties_left[i]` equal to it (counting down across the slices of the tensor, in order); in place."""
    flat, cut = delta.view(-1), 0
    if ties_left[i] > 0 and threshold > 0:  # (tied zeros change nothing)
        cut, kept = _tie_cut(flat, None, threshold, ties_left[i])
        ties_left[i] -= kept
    _trim_ranges_(flat.unsqueeze(0), [(0, cut, [below(threshold)]), (cut, flat.numel(), [threshold])])
    return delta


def task_vectors(job: TensorJob) -> torch.Tensor:
    """τ_i = θ_i − θ_pre stacked into one new float32 tensor (the method may overwrite it); from inputs in
    float32 or, for TIES with compiled kernels, as stored (`Method.raw_inputs`)."""
    deltas = stack(job)
    return (deltas if deltas.dtype in (torch.float32, torch.float64) else deltas.float()).sub_(job.base)


def ties(job: TensorJob) -> torch.Tensor:
    params, context = job.params, job.context
    lam, compiled = params["lambda"], context.get("fused", False)
    if params["scope"] == "tensor" and "tensor_trim" in context:  # a slice of a large tensor, after its scan
        ranges = _slice_ranges(job, context["tensor_trim"])
        if compiled:
            base, tensors = job.base.flatten(), [t.flatten() for t in job.tensors]
            parts = [fused.ties_combine(base[start:stop], [t[start:stop] for t in tensors], limits, lam,
                                        context["zero_sign"], dtype=kernel_dtype(job)) for start, stop, limits in ranges]
            if None not in parts:
                return (parts[0] if len(parts) == 1 else torch.cat(parts)).view(job.base.shape)
        return _combined(job, _trim_ranges_(task_vectors(job), ranges), context["zero_sign"], compiled)
    if params["scope"] == "tensor":
        # The stacked task vectors are trimmed and averaged in place: on a large embedding matrix every
        # temporary copy of the stack is hundreds of MB.
        deltas = task_vectors(job)
        for d in deltas:
            trim_tensor_(d, params["density"], params["tie_break"])
        rule = zero_sign_rule(params)
        if rule == "plus":
            return _combined(job, deltas, 1.0, compiled)
        total = deltas.sum(0)
        return _combined(job, deltas, _fallback(float(total.double().sum()), float(total.sign().sum()), rule), False)
    thresholds = context.get("thresholds")
    fallback = context.get("zero_sign", 1.0)
    if params["density"] < 1 and thresholds is not None:
        if compiled:
            merged = fused.ties_combine(job.base, job.tensors, [below(t) for t in thresholds], lam, fallback,
                                        dtype=kernel_dtype(job))
            if merged is not None:
                return merged
        deltas = task_vectors(job)
        limits = torch.tensor(thresholds, dtype=deltas.dtype, device=deltas.device)
        deltas.mul_(deltas.abs() >= limits.view(-1, *([1] * (deltas.dim() - 1))))
    else:
        deltas = task_vectors(job)
    return _combined(job, deltas, fallback, compiled)


def _combined(job: TensorJob, deltas: torch.Tensor, fallback: float, compiled: bool) -> torch.Tensor:
    """θ_pre + λ · the disjoint mean of the trimmed task vectors under the elected sign (`fallback` where
    their sum is 0): compiled when asked (the deltas then untrimmed further), else eagerly in place."""
    if compiled:
        merged = fused.ties_disjoint(job.base, deltas, job.params["lambda"], fallback)
        if merged is not None:
            return merged
    total = deltas.sum(0)
    elected = torch.where(total == 0, torch.full_like(total, fallback), total.sign())
    return disjoint_mean_(deltas, elected).mul_(job.params["lambda"]).add_(job.base)


def dare(job: TensorJob) -> torch.Tensor:
    deltas = task_vectors(job)
    p = job.params["drop_rate"]
    if p > 0:
        generator = torch.Generator().manual_seed(job.seed)
        keep = torch.rand(deltas.shape, generator=generator).to(deltas.device) >= p
        deltas = deltas * keep
        if job.params["rescale"] and p < 1:
            deltas = deltas / (1 - p)
    if job.params["combine"] == "linear":
        return job.base + job.params["lambda"] * deltas.sum(0)
    elected = torch.where(deltas.sum(0) >= 0, 1.0, -1.0).to(deltas.dtype)
    return disjoint_mean_(deltas, elected).mul_(job.params["lambda"]).add_(job.base)


def _ties_yaml(params: dict) -> dict | None:
    if params["scope"] != "tensor" or zero_sign_rule(params) != "plus" or params["tie_break"] != "sort":
        return None  # mergekit trims per tensor only, breaks a zero elected sign towards +, and ties by its sort
    return {"merge_method": "ties", "default_weight": 1.0, "model_parameters": {"density": params["density"]},
            "parameters": {"lambda": params["lambda"], "normalize": True}}


def _dare_yaml(params: dict) -> dict | None:
    if params["combine"] != "linear" or not params["rescale"]:
        return None  # mergekit's dare_ties sums instead of taking the disjoint mean
    return {"merge_method": "dare_linear", "default_weight": params["lambda"],
            "model_parameters": {"density": 1 - params["drop_rate"]},
            "note": "mergekit draws its own random masks and rescales each sparsified tensor to its L1 norm "
                    "before the drop (MergeLab: by 1/(1-p), as the DARE paper): same method, different numbers"}


register(Method(
    name="ties", title="TIES", family="data-free",
    paper="Yadav et al. 2023, TIES-Merging, arXiv:2306.01708, Algorithm 1 (trim, elect sign, disjoint merge)",
    params=(Param("density", "float", 0.2, "fraction of each task vector kept (top by magnitude)", low=0.0,
                  high=1.0),
            Param("scope", "choice", "model", "rank magnitudes over the whole model (paper) or per tensor "
                  "(mergekit)", choices=("model", "tensor")),
            Param("lambda", "float", 1.0, "scale λ of the merged task vector", low=0.0, high=3.0),
            Param("zero_sign", "choice", "auto", "sign where the elected sum is 0: the sign of the grand total "
                  "(total, paper), of the majority of elected signs (majority, authors' code), + (plus, "
                  "mergekit); auto = total for scope model, plus for scope tensor",
                  choices=("auto", "total", "majority", "plus")),
            Param("tie_break", "choice", "sort", "scope tensor: of the entries tied with the k-th largest "
                  "magnitude, keep those mergekit's sort keeps (sort: its output bit for bit) or the first in "
                  "index order (index: the same on every device, and large tensors stream in slices)",
                  choices=("sort", "index"))),
    merge_tensor=ties, needs_base=True, prepare=_model_thresholds, mergekit=_ties_yaml, compiled=True,
    raw_inputs="compiled", neutral={"density": 1.0, "lambda": 1.0}, elementwise=lambda params: params["scope"] == "model",
    scan=lambda params: _tensor_scan if params["scope"] == "tensor" and params["tie_break"] == "index" else None,
    doc="Trim small task-vector entries, elect a sign, average the agreeing ones."))

register(Method(
    name="dare", title="DARE", family="data-free",
    paper="Yu et al. 2024, Language models are Super Mario (DARE), arXiv:2311.03099, eq. 2-3",
    params=(Param("drop_rate", "float", 0.5, "probability p of dropping each task-vector entry", low=0.0,
                  high=1.0),
            Param("rescale", "bool", True, "rescale survivors by 1/(1−p)"),
            Param("combine", "choice", "linear", "add the task vectors (linear) or TIES-style sign election",
                  choices=("linear", "ties")),
            Param("lambda", "float", 0.3, "scale λ of the combined task vectors", low=0.0, high=3.0),
            Param("seed", "int", 0, "seed of the random drop masks", low=0)),
    merge_tensor=dare, needs_base=True, mergekit=_dare_yaml, neutral={"drop_rate": 0.0, "lambda": 1.0},
    doc="Randomly drop and rescale task-vector entries, then combine."))
