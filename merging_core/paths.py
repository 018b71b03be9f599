"""Geometry of paths between checkpoints: lines, quadratic Bezier curves, planes; barriers, distances.

Every point of a path is an affine combination θ = Σ_k c_k θ_k of a few *vertices* (the checkpoints,
plus a trained bend for a Bezier curve), applied parameter by parameter:

- **line** (Qin et al. 2022, "Exploring Mode Connectivity for Pre-trained Language Models",
  arXiv:2210.14102, Sec. 3): θ(α) = (1 − α) θ_A + α θ_B, α ∈ [0, 1];
- **quadratic Bezier curve** with one bend θ_C (Garipov et al. 2018, "Loss Surfaces, Mode Connectivity,
  and Fast Ensembling of DNNs", arXiv:1802.10026, eq. 3 with one bend):
  θ(t) = (1 − t)² θ_A + 2t(1 − t) θ_C + t² θ_B;
- **plane** through three checkpoints (Garipov et al. 2018, Sec. 4): an orthonormal basis (u, v) of
  span{θ_B − θ_A, θ_C − θ_A} by Gram–Schmidt, θ(x, y) = θ_A + x u + y v, with x and y in units of
  parameter distance. The basis is never materialised: (x, y) turns into coefficients on the vertices.

Coefficients of 1 and 0 are exact in floating point, so the endpoints of a path are the checkpoints bit
for bit, and scoring them reproduces each model's own scores.

**Barrier** of a path (Qin et al. 2022): the height of the worst point above the straight line through the
end values, max_α [L(α) − ((1 − α) L_A + α L_B)] for a loss, with the sign flipped for a metric where
higher is better (0 for a path that never rises above that line); also the variant against the mean
of the ends, max_α L(α) − ½ (L_A + L_B) (Verma & Elbayad 2024, arXiv:2403.00986).

**Distances** (Qin et al. 2022): ‖θ_A − θ_B‖₂, the RMS distance √(‖θ_A − θ_B‖² / n) over the n scalar parameters,
the cosine of θ_A and θ_B, and the cosine of the task vectors θ − θ_0 when the base θ_0 is known.
All inner products are accumulated in float64 relative to one origin vertex, so a distance between
identical checkpoints is exactly zero.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .errors import MergeLabError

PATHS = ("line", "bezier")


def positions(points: int) -> list[float]:
    """`points` evenly spaced positions in [0, 1], both ends included exactly."""
    if points < 2:
        raise MergeLabError(f"a curve needs at least 2 points (its two ends), got {points}", param="points")
    return [i / (points - 1) for i in range(points)]


def line(t: float) -> tuple[float, float]:
    """Coefficients on (θ_A, θ_B)."""
    return 1.0 - t, t


def bezier(t: float) -> tuple[float, float, float]:
    """Coefficients on (θ_A, θ_B, bend θ_C) of the quadratic Bezier curve."""
    return (1.0 - t) ** 2, t * t, 2.0 * t * (1.0 - t)


def combine_into(target: torch.Tensor, vertices: Sequence[torch.Tensor], coefficients: Sequence[float]) -> None:
    """target ← Σ_k c_k v_k in place (no temporaries). Exact when one coefficient is 1 and the rest 0."""
    first = next((k for k, c in enumerate(coefficients) if c != 0), None)
    if first is None:
        target.zero_()
        return
    torch.mul(vertices[first], coefficients[first], out=target)
    for vertex, c in zip(vertices[first + 1:], coefficients[first + 1:]):
        if c != 0:
            target.add_(vertex, alpha=c)


# ----------------------------------------------------------------------------------------------------
# inner products


@dataclass(frozen=True)
class Geometry:
    """Inner products of a few points θ_0 … θ_k over the same parameters (float64).

    `diff[i, j]` = (θ_i − θ_0)·(θ_j − θ_0) (exact zeros for identical points), `inner[i, j]` = θ_i·θ_j.
    """

    count: int  # scalar parameters summed over
    inner: np.ndarray
    diff: np.ndarray

    def dot(self, i: int, j: int, origin: int = 0) -> float:
        """(θ_i − θ_o)·(θ_j − θ_o)."""
        d = self.diff
        return float(d[i, j] - d[i, origin] - d[j, origin] + d[origin, origin])

    def distance(self, i: int, j: int) -> float:
        return math.sqrt(max(self.dot(i, i, origin=j), 0.0))

    def rms(self, i: int, j: int) -> float:
        return self.distance(i, j) / math.sqrt(max(self.count, 1))

    def cosine(self, i: int, j: int, origin: int | None = None) -> float:
        """cos(θ_i, θ_j), or of θ_i − θ_o and θ_j − θ_o (task vectors) when an origin is given; NaN for a zero vector."""
        if origin is None:
            ij, ii, jj = self.inner[i, j], self.inner[i, i], self.inner[j, j]
        else:
            ij, ii, jj = self.dot(i, j, origin), self.dot(i, i, origin), self.dot(j, j, origin)
        norms = math.sqrt(max(ii, 0.0) * max(jj, 0.0))
        return float(ij / norms) if norms > 0 else float("nan")


def geometry(points: Sequence[Mapping[str, torch.Tensor]], names: Sequence[str]) -> Geometry:
    """Inner products of `points` (name -> tensor) over `names`, in one float64 pass."""
    k = len(points)
    diff = torch.zeros(k, k, dtype=torch.float64)
    origin_dot = torch.zeros(k, dtype=torch.float64)  # θ_0·(θ_i − θ_0)
    origin_sq = 0.0
    count = 0
    for name in names:
        origin = points[0][name].double().flatten()
        deltas = torch.stack([p[name].double().flatten() - origin for p in points])  # row 0 is zeros
        diff += (deltas @ deltas.T).cpu()
        origin_dot += (deltas @ origin).cpu()
        origin_sq += float(origin @ origin)
        count += origin.numel()
    # θ_i·θ_j = θ_0·θ_0 + θ_0·d_i + θ_0·d_j + d_i·d_j
    inner = origin_sq + origin_dot[:, None] + origin_dot[None, :] + diff
    return Geometry(count, inner.numpy(), diff.numpy())


def distances(geo: Geometry, a: int = 0, b: int = 1, base: Geometry | None = None,
              base_index: int = 2) -> dict[str, float | int | None]:
    """The distances between points a and b (and their task vectors' cosine when `base` holds θ_0 too)."""
    out: dict[str, float | int | None] = {
        "l2": geo.distance(a, b), "rms": geo.rms(a, b), "cosine": _finite(geo.cosine(a, b)), "params": geo.count,
        "task_cosine": None, "task_params": None,
    }
    if base is not None:  # a zero task vector (a checkpoint equal to the base) has no direction: None
        out["task_cosine"] = _finite(base.cosine(a, b, origin=base_index))
        out["task_params"] = base.count
    return out


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


# ----------------------------------------------------------------------------------------------------
# planes and projections


@dataclass(frozen=True)
class PlaneFrame:
    """Orthonormal coordinates on the plane through θ_A, θ_B, θ_C.

    u = (θ_B − θ_A) / ‖θ_B − θ_A‖; v = the part of θ_C − θ_A orthogonal to u, normalised. So θ_A sits at
    (0, 0), θ_B at (‖θ_B − θ_A‖, 0) and θ_C at (`shift`, `height`).
    """

    length: float  # ‖θ_B − θ_A‖
    shift: float  # (θ_C − θ_A)·u
    height: float  # ‖θ_C − θ_A − shift·u‖

    @classmethod
    def through(cls, geo: Geometry, a: int = 0, b: int = 1, c: int = 2) -> "PlaneFrame":
        length = math.sqrt(max(geo.dot(b, b, a), 0.0))
        if length == 0:
            raise MergeLabError("checkpoints A and B are identical, so they span no plane; pick another pair")
        shift = geo.dot(c, b, a) / length
        height = math.sqrt(max(geo.dot(c, c, a) - shift * shift, 0.0))
        if height <= 1e-6 * max(length, math.sqrt(max(geo.dot(c, c, a), 0.0))):
            raise MergeLabError("checkpoint C lies on the line through A and B, so the three span no plane; "
                                "pick a C off that line")
        return cls(length, shift, height)

    def vertices(self) -> list[tuple[float, float]]:
        return [(0.0, 0.0), (self.length, 0.0), (self.shift, self.height)]

    def coefficients(self, x: float, y: float) -> tuple[float, float, float]:
        """Coefficients on (θ_A, θ_B, θ_C) of the plane point (x, y)."""
        c_c = y / self.height
        c_b = (x - c_c * self.shift) / self.length
        return 1.0 - c_b - c_c, c_b, c_c

    def project(self, along_b: float, along_c: float, squared: float) -> tuple[float, float, float]:
        """(x, y, distance from the plane) of a point θ given (θ − θ_A)·(θ_B − θ_A), (θ − θ_A)·(θ_C − θ_A)
        and ‖θ − θ_A‖²."""
        x = along_b / self.length
        y = (along_c - x * self.shift) / self.height
        return x, y, math.sqrt(max(squared - x * x - y * y, 0.0))

    def grid(self, steps: int, margin: float = 0.25) -> tuple[list[float], list[float]]:
        """Axis values covering the three vertices with `margin` of the span on every side."""
        if steps < 2:
            raise MergeLabError(f"a plane grid needs at least 2 steps per axis, got {steps}")
        xs = [0.0, self.length, self.shift]
        ys = [0.0, self.height]
        return _axis(min(xs), max(xs), steps, margin), _axis(min(ys), max(ys), steps, margin)


def _axis(low: float, high: float, steps: int, margin: float) -> list[float]:
    pad = margin * (high - low)
    return np.linspace(low - pad, high + pad, steps).tolist()


def project_on_line(geo: Geometry, point: int, a: int = 0, b: int = 1) -> tuple[float, float]:
    """(α, distance from the line) of θ_point against θ(α) = (1 − α) θ_a + α θ_b."""
    length_sq = geo.dot(b, b, a)
    if length_sq == 0:
        return 0.0, geo.distance(point, a)
    alpha = geo.dot(point, b, a) / length_sq
    return alpha, math.sqrt(max(geo.dot(point, point, a) - alpha * alpha * length_sq, 0.0))


# ----------------------------------------------------------------------------------------------------
# barriers


def barrier(ts: Sequence[float], values: Sequence[float], *, higher_is_better: bool) -> tuple[float, float]:
    """(height, position) of the worst point above the straight line between the end values.

    For a loss: max_t [v(t) − ((1 − t) v_0 + t v_1)]; for a metric where higher is better the gap is
    measured below that line. The ends lie on the line, so the height is never negative.
    """
    if len(values) < 2:
        raise ValueError("a barrier needs at least the two end values")
    start, end = values[0], values[-1]
    sign = -1.0 if higher_is_better else 1.0
    gaps = [sign * (v - ((1 - t) * start + t * end)) for t, v in zip(ts, values)]
    worst = int(np.nanargmax(gaps))
    return float(gaps[worst]) + 0.0, float(ts[worst])  # + 0.0: no "-0.0" for a flat path


def barrier_vs_mean_ends(values: Sequence[float], *, higher_is_better: bool) -> float:
    """The barrier against the mean of the ends: max_t L(t) − ½ (L_0 + L_1) (for a higher-is-better metric: ½ (M_0 + M_1) − min_t M(t))."""
    mean_ends = 0.5 * (values[0] + values[-1])
    return float(mean_ends - min(values)) if higher_is_better else float(max(values) - mean_ends)
