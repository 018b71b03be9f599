"""Which entries torch's CPU `argsort(descending=True)` puts first, without sorting.

mergekit's TIES keeps `argsort(|τ|, descending=True)[:k]`: exactly k entries, and of the entries tied with
the k-th largest magnitude (common in bf16 and fp16), whichever the unstable sort happens to leave in
front. Reproducing that set used to mean running the same O(n log n) sort on every tensor.

torch's CPU sort is libstdc++'s `std::sort` (an introsort: median-of-three quicksort partitions down to
segments of 16, then one insertion sort) on (value, index) pairs. Which entries end up in front of position
k depends only on the partitions of the segments that contain position k: a segment entirely in front of
k is kept whatever order it is sorted into, one entirely behind it is dropped. So the same partitions,
followed down the one segment that holds k (a quickselect with the sort's own pivots and swaps), give the
same set in expected linear time. Each partition is computed vectorised: Hoare's scheme swaps the i-th
entry ≤ pivot from the left with the i-th entry ≥ pivot from the right for as long as the two have not
crossed, so both sequences come from two masks.

`sorted_top` checks once per process, on arrays full of ties, that this reproduces the `argsort` of the
torch it runs on (a different C++ library or a new sort would differ) and otherwise runs that argsort.
"""

from __future__ import annotations

import bisect
import functools

import torch

SEGMENT = 16  # libstdc++'s _S_threshold: the introsort leaves segments this short to the insertion sort
WINDOWED = 1 << 16  # partitions of segments this long look for the scans' stops near their estimated meeting
SAMPLE = 256  # ... which every SAMPLE-th entry estimates


def sorted_top(values: torch.Tensor, k: int) -> torch.Tensor:
    """A flat mask of the entries `torch.argsort(values, descending=True)[:k]` names, on any device.

    `values`: a flat float tensor; on the CPU it is overwritten (callers pass a temporary)."""
    n = values.numel()
    if values.device.type == "cpu" and 0 < k < n and _emulates_torch_sort() and not values.isnan().any():
        keep = _introselect(values, k)
        if keep is not None:
            return keep
    keep = torch.zeros(n, dtype=torch.bool, device=values.device)
    keep[torch.argsort(values, descending=True)[:k]] = True
    return keep


def _introselect(values: torch.Tensor, k: int) -> torch.Tensor | None:
    """The mask of `sorted_top`, following the introsort's partitions down the segment that holds position
    k; None where the introsort would switch to heapsort (its depth limit), which is not reproduced."""
    n = values.numel()
    keep = torch.zeros(n, dtype=torch.bool)
    v, idx = values, None  # idx: the segment's original positions (None: the first segment, in place)
    depth = 2 * (n.bit_length() - 1)  # std::__lg(n) * 2
    while v.numel() > SEGMENT and 0 < k < v.numel():
        if depth == 0:
            return None
        depth -= 1
        cut, lefts, rights, m = _partition(v)
        if idx is not None:
            idx[[0, m]] = idx[[m, 0]]
        if k < cut:  # the segment in front of the cut holds position k; the rest is dropped
            v, idx = _side(v, idx, m, 0, cut, lefts, rights)
        else:  # everything in front of the cut is kept
            if idx is None:
                keep[:cut] = True
                keep[0], keep[m] = m < cut, True  # (the pivot's swap: position 0 holds entry m)
            else:
                keep[idx[:cut]] = True
            keep[_original(idx, m, lefts)] = False
            keep[_original(idx, m, rights)] = True
            v, idx = _side(v, idx, m, cut, v.numel(), rights, lefts)
            k -= cut
    if idx is None:
        idx = torch.arange(n)
    if 0 < k < v.numel():  # the insertion sort's order: stable, descending
        keep[idx[torch.argsort(v, descending=True, stable=True)[:k]]] = True
    elif k:
        keep[idx] = True
    return keep


def _original(idx: torch.Tensor | None, m: int, positions: torch.Tensor) -> torch.Tensor:
    """The original positions of a segment's `positions`; idx None: the first segment, where only the
    pivot's swap (position 0 with m) has moved entries (no index of the whole tensor is built)."""
    if idx is not None:
        return idx[positions]
    return torch.where(positions == 0, m, torch.where(positions == m, 0, positions))


def _partition(v: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor, int]:
    """libstdc++'s `__unguarded_partition_pivot` with the comparison a > b, on the whole of `v`: the
    median of v[1], v[mid], v[-1] is swapped to the front and is the pivot. Returns the cut and the
    positions the partition swaps pairwise (lefts[i] with rights[i]) without swapping them; the pivot's
    own swap (position 0 with m, also returned) is made in place in `v`."""
    n = v.numel()
    a, b, c = 1, n // 2, n - 1
    va, vb, vc = float(v[a]), float(v[b]), float(v[c])
    if va > vb:
        m = b if vb > vc else (c if va > vc else a)
    else:
        m = a if va > vc else (c if vb > vc else b)
    v[[0, m]] = v[[m, 0]]
    pivot = v[0]
    if n >= WINDOWED:  # first the stops near where the scans will cross, which is all the swaps need
        middle, margin = _estimated_crossing(v, pivot), n // 32 + 4096
        found = _crossing(v, pivot, min(n, middle + margin), max(0, middle - margin))
        if found is not None:
            return (*found, m)
    return (*_crossing(v, pivot, n, 0), m)


def _crossing(v: torch.Tensor, pivot: torch.Tensor, left_end: int, right_start: int):
    """(cut, lefts, rights) of `_partition` from the left scan's stops in [1, left_end) and the right
    scan's in [right_start, n); None when the scans do not cross inside those windows."""
    # The left scan stops at entries ≤ pivot (from position 1 up), the right scan at entries ≥ pivot (from
    # the end down, the pivot itself included): the i-th stops are swapped until they cross.
    lefts = torch.nonzero(v[:left_end] <= pivot).flatten()[1:]  # (position 0 is the pivot)
    rights = torch.nonzero(v[right_start:] >= pivot).flatten()
    if right_start:
        rights += right_start
    count = min(lefts.numel(), rights.numel())
    # (the first i at which they have crossed: from there on they stay crossed)
    swaps = bisect.bisect_left(range(count), True, key=lambda i: int(lefts[i]) >= int(rights[-1 - i]))
    if swaps == count and (left_end < v.numel() or right_start > 0):
        return None
    # The partition returns where the left scan stops next: at its next stop, or at the last swapped
    # right position (which now holds an entry ≤ pivot), whichever comes first.
    stops = ([int(lefts[swaps])] if swaps < lefts.numel() else []) + ([int(rights[-swaps])] if swaps else [])
    return min(stops), lefts[:swaps], rights[rights.numel() - swaps:].flip(0)


def _estimated_crossing(v: torch.Tensor, pivot: torch.Tensor) -> int:
    """Where the two scans of a partition meet, estimated from every SAMPLE-th entry: the first sampled
    position with as many stops of the left scan before it as of the right scan after it."""
    sample = v[::SAMPLE]
    before = (sample <= pivot).cumsum(0)
    after = (sample >= pivot).flip(0).cumsum(0).flip(0)
    return int(torch.count_nonzero(before < after)) * SAMPLE


def _side(v, idx, m: int, start: int, stop: int, mine: torch.Tensor, theirs: torch.Tensor):
    """The segment [start, stop) after the partition's swaps: positions `mine` (inside it) receive the
    entries at `theirs` (outside it). Returns fresh values and original positions."""
    mine = mine - start if start else mine
    new_v = v[start:stop].clone()
    new_v[mine] = v[theirs]
    if idx is None:
        new_idx = torch.arange(start, stop, dtype=torch.int32 if stop < 2**31 else torch.int64)
        for position, entry in ((0, m), (m, 0)):  # the pivot's swap
            if start <= position < stop:
                new_idx[position - start] = entry
    else:
        new_idx = idx[start:stop].clone()
    new_idx[mine] = _original(idx, m, theirs).to(new_idx.dtype)
    return new_v, new_idx


@functools.cache
def _emulates_torch_sort() -> bool:
    """Whether `_introselect` gives this torch's argsort on arrays full of ties (checked once)."""
    generator = torch.Generator().manual_seed(0)
    for n, distinct in ((17, 3), (40, 2), (1000, 7), (5000, 60), (70000, 500)):
        values = torch.randint(0, distinct, (n,), generator=generator).float()
        for k in (1, n // 3, n - 1):
            expected = torch.zeros(n, dtype=torch.bool)
            expected[torch.argsort(values, descending=True)[:k]] = True
            got = _introselect(values.clone(), k)
            if got is None or not torch.equal(got, expected):
                return False
    return True
