"""Knowledge along a path: which examples a model answers correctly at each point of a curve.

Qin et al. 2022, "Exploring Mode Connectivity for Pre-trained Language Models" (arXiv:2210.14102),
the analysis of how task knowledge changes along the path connecting two fine-tuned checkpoints: a
point of the path may lose what both ends know. Here the knowledge of a classification task is the set
of examples answered correctly (argmax == gold). A curve run with `examples=True` (see
`merging_core.curves`) records one boolean column per point; `summarize` turns the (examples x points)
matrix into:

- the examples that flip along the path, with the first point where each is lost (correct at the
  point before, wrong here) and the first later point where it is regained;
- per-point counts: correct, lost against A (right at A, wrong here), gained against A, and forgotten
  (right at both ends, wrong here);
- the share forgotten at the barrier point: of the examples right at both ends, those wrong at the
  barrier point (the point of highest loss above the chord between the end losses; where the end
  losses are equal, simply the point of highest loss);
- how concentrated forgetting is: the share of all (example, point) forgetting events borne by the
  tenth of the examples known at both ends that are forgotten at the most points.

`summarize` is pure (numpy in, JSON-ready dict out), so its answers can be checked by hand.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .data import load_split
from .errors import MergeLabError
from .tasks import get_task

TOP = 20  # most-forgotten examples listed in a summary


def _first(row: np.ndarray, start: int = 0) -> int | None:
    hits = np.flatnonzero(row[start:])
    return int(hits[0]) + start if len(hits) else None


def summarize(correct: np.ndarray | Sequence[Sequence[bool]], ts: Sequence[float], barrier: int, *,
              ends: tuple[Sequence[bool], Sequence[bool]] | None = None, top: int = TOP) -> dict:
    """The knowledge summary of an (examples x points) boolean matrix `correct` (row i, column k: example
    i answered correctly at point k, at position `ts[k]`), with `barrier` the column of the barrier point.

    `ends`: each end model's own correctness (A, B); default the first and last columns (a line whose
    ends are the two models). Returns {"examples", "points", "ts", "barrier", "barrier_t", "counts"
    (per point: correct, lost, gained, forgotten), "known_both", "forgotten_at_barrier",
    "forgotten_at_barrier_share", "forgotten_ever", "top_decile_share", "flips" (one row per example
    whose answer changes along the path: index, first_lost, first_regained, points_forgotten), "order"
    (every example, flipped ones first by first loss), "most_forgotten" (the `top` examples known at
    both ends and forgotten at the most points)}. Positions are column indices.
    """
    matrix = np.asarray(correct, dtype=bool)
    if matrix.ndim != 2:
        raise MergeLabError(f"a knowledge matrix is (examples x points), got shape {matrix.shape}")
    n, points = matrix.shape
    if len(ts) != points:
        raise MergeLabError(f"{len(ts)} positions for a matrix of {points} points")
    if not 0 <= barrier < points:
        raise MergeLabError(f"barrier column {barrier} is outside 0..{points - 1}")
    a_right, b_right = ((matrix[:, 0], matrix[:, -1]) if ends is None
                        else (np.asarray(ends[0], dtype=bool), np.asarray(ends[1], dtype=bool)))
    if a_right.shape != (n,) or b_right.shape != (n,):
        raise MergeLabError(f"the end models' correctness must have one entry per example ({n})")
    both = a_right & b_right
    wrong = ~matrix
    forgotten = wrong & both[:, None]  # known at both ends, not here
    counts = [{"t": float(ts[k]), "correct": int(matrix[:, k].sum()), "lost": int((a_right & wrong[:, k]).sum()),
               "gained": int((~a_right & matrix[:, k]).sum()), "forgotten": int(forgotten[:, k].sum())}
              for k in range(points)]
    # a loss at column k: right at k - 1, wrong at k; a regain: wrong at k - 1, right at k
    lost = np.zeros_like(matrix)
    lost[:, 1:] = matrix[:, :-1] & wrong[:, 1:]
    regained = np.zeros_like(matrix)
    regained[:, 1:] = wrong[:, :-1] & matrix[:, 1:]
    depth = forgotten.sum(1)
    flips = []
    first_lost: list[int | None] = [None] * n
    sort_keys = [(1, points, i) for i in range(n)]  # steady examples last
    for i in np.flatnonzero(matrix.any(1) & wrong.any(1)):
        loss = _first(lost[i])
        back = _first(regained[i], loss + 1) if loss is not None else _first(regained[i])
        first_lost[i] = loss
        # flipped examples first, by first loss; one never lost (wrong at A, right later) by its first gain
        sort_keys[i] = (0, loss if loss is not None else back, int(i))
        flips.append({"index": int(i), "first_lost": loss, "first_regained": back,
                      "points_forgotten": int(depth[i]), "right_at_ends": [bool(a_right[i]), bool(b_right[i])]})
    order = sorted(range(n), key=lambda i: sort_keys[i])
    known = int(both.sum())
    at_barrier = int(forgotten[:, barrier].sum())
    ever = np.flatnonzero(depth > 0)
    events = int(depth.sum())
    ranked = sorted(np.flatnonzero(both).tolist(), key=lambda i: (-int(depth[i]), first_lost[i] or points, i))
    decile = ranked[: max(1, int(np.ceil(0.1 * known)))] if known else []
    return {"examples": n, "points": points, "ts": [float(t) for t in ts], "barrier": int(barrier),
            "barrier_t": float(ts[barrier]), "counts": counts, "known_both": known,
            "forgotten_at_barrier": at_barrier, "forgotten_at_barrier_share": at_barrier / known if known else None,
            "forgotten_ever": len(ever), "forgotten_ever_share": len(ever) / known if known else None,
            "forget_events": events,
            "top_decile_share": float(depth[decile].sum()) / events if events else None,
            "flips": flips, "order": order,
            "most_forgotten": [{"index": int(i), "points_forgotten": int(depth[i]), "first_lost": first_lost[i]}
                               for i in ranked[:top] if depth[i] > 0]}


def barrier_column(ts: Sequence[float], losses: Sequence[float]) -> int:
    """The column of the barrier point: the highest loss above the chord between the end losses (see
    `paths.barrier`; with equal end losses, the highest loss)."""
    start, end = losses[0], losses[-1]
    gaps = [v - ((1 - t) * start + t * end) for t, v in zip(ts, losses)]
    return int(np.nanargmax(gaps))


def example_rows(task: str, split: str, indices: Sequence[int], *, chars: int = 300) -> list[dict]:
    """The text fields and gold label of examples `indices` of a task split, for tables (each text cut
    to `chars` characters)."""
    spec = get_task(task)
    raw = load_split(spec, split)
    names = spec.text_columns or ("text",)
    rows = []
    for i in indices:
        texts = raw.texts[int(i)]
        texts = (texts,) if isinstance(texts, str) else tuple(texts)
        label = raw.labels[int(i)] if raw.labels is not None else None
        gold = spec.labels[label] if spec.labels and isinstance(label, int) else label
        rows.append({"index": int(i), **{name: str(text)[:chars] for name, text in zip(names, texts)}, "gold": gold})
    return rows
