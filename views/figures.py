"""Plotly figures built from the engine's plain results (dicts of floats). No tensor math here."""

from __future__ import annotations

import math

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from merging_core.metrics import metric_label

# One colour per task, one dash per path kind: a line and a Bezier curve of the same task read together.
PALETTE = ("#4f46e5", "#0ea5e9", "#f59e0b", "#10b981", "#ef4444", "#8b5cf6", "#ec4899")
DASH = {"line": "solid", "bezier": "dot"}
MERGE_SYMBOLS = ("diamond", "star", "square", "triangle-up", "x", "cross", "pentagon", "hexagon")
LAYOUT = {"template": "plotly_white", "font": {"size": 13}, "margin": {"l": 60, "r": 20, "t": 40, "b": 40},
          "legend": {"orientation": "h", "yanchor": "top", "y": -0.12, "x": 0}}
# figures with panel titles: the extra top margin keeps them clear of the Plot component's label
TITLED = {**LAYOUT, "margin": {**LAYOUT["margin"], "t": 70}}


def _color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


# Headline metrics with a fixed range: their axes get a minimum span, so a few examples' difference does
# not fill the panel. Accuracies also get a noise band around the chord (one binomial standard error).
UNIT_METRICS = ("accuracy", "token_accuracy", "f1", "macro_f1", "precision", "recall")
SIGNED_METRICS = ("mcc", "pearson", "spearman")
BINOMIAL_METRICS = ("accuracy", "token_accuracy")
MIN_SPAN_EXAMPLES = 10  # a metric axis spans at least this many examples' worth (10 / n)
MIN_SPAN_METRIC = 0.05  # ... and at least this much of a bounded metric
MIN_SPAN_LOSS = 0.1  # a loss axis spans at least this share of the loss at A
X_PAD = 0.02  # room around t in [0, 1], as a share of the span
CHORD = "chord: A → B, linear"


def min_span(key: str, n: int | None, anchor: float) -> float:
    """The least height of a panel's y axis for `key` (a metric or "loss") scored on `n` examples, around
    the value `anchor` at A: at least `MIN_SPAN_EXAMPLES` / n and `MIN_SPAN_METRIC` for bounded metrics."""
    if key in UNIT_METRICS or key in SIGNED_METRICS:
        return max(MIN_SPAN_METRIC, MIN_SPAN_EXAMPLES / n if n else 0.0)
    return max(MIN_SPAN_LOSS * abs(anchor), 1e-3)


def _bounds(key: str) -> tuple[float, float]:
    if key in UNIT_METRICS:
        return 0.0, 1.0
    if key in SIGNED_METRICS:
        return -1.0, 1.0
    return -float("inf"), float("inf")


def y_range(values: list[float], anchors: list[tuple[float, float, str]]) -> list[float] | None:
    """A panel's y range: every value drawn, and an interval of each `anchor` (value at A, least span, key)
    kept inside the metric's bounds, with 6 % padding. It only grows as values are added (the anchors stay),
    so a streaming plot never rescales inwards."""
    low = [v for v in values if v is not None and math.isfinite(v)]
    high = list(low)
    for value, span, key in anchors:
        floor, ceiling = _bounds(key)
        span = min(span, ceiling - floor)  # 10 / n on a few examples: the whole range, not beyond it
        start = min(max(value - span / 2, floor), ceiling - span)
        low.append(start)
        high.append(start + span)
    if not low:
        return None
    bottom, top = min(low), max(high)
    pad = 0.06 * (top - bottom) or 0.05
    return [bottom - pad, top + pad]


def _counts(curves: list[dict], tasks: list[tuple[str, str]]) -> dict[str, tuple[int | None, str]]:
    """task -> (examples scored, split), from the first point that has the task's scores."""
    out: dict[str, tuple[int | None, str]] = {}
    for curve in curves:
        for item in curve["items"]:
            for task, _ in tasks:
                scores = item.get("scores", {}).get(task)
                if scores and task not in out:
                    out[task] = (scores.get("n"), scores.get("split", "dev"))
    return out


def _panel_title(names: list[str], tasks: list[tuple[str, str]], counts: dict) -> str:
    """'sst2 accuracy · 200 dev examples', or each task's count when they differ."""
    seen = {counts[t] for t, _ in tasks if t in counts and counts[t][0]}
    if len(seen) == 1:
        n, split = next(iter(seen))
        return " · ".join([*names, f"{n} {split} examples"])
    return " · ".join(f"{name} ({counts[t][0]} {counts[t][1]})" if counts.get(t, (None,))[0] else name
                      for name, (t, _) in zip(names, tasks))


def _labels(curves: list[dict], tasks: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """(task, key) -> how the key reads, from the task's first scores: a language model's loss says which
    loss it is ("next-token loss" for a causal LM, "MLM loss" for a masked LM, "span loss" for a T5), anything
    else its name."""
    out: dict[tuple[str, str], str] = {}
    for task, metric in tasks:
        scores = next((item["scores"][task] for curve in curves for item in curve["items"]
                       if task in item.get("scores", {})), None)
        for key in (metric, "loss"):
            out[task, key] = metric_label(key, scores)
    return out


def curve_figure(curves: list[dict], tasks: list[tuple[str, str]]) -> go.Figure:
    """Metric (top) and loss (bottom) along one or more paths between the same two checkpoints.

    `curves`: [{"path": "line" | "bezier", "items": [curve items as the engine yields them], "label": optional
    legend name, e.g. "aligned"}];
    `tasks`: [(task, headline metric)]. The grey dashed chord joins a finished curve's end values: the
    barrier is the largest gap between it and the curve; for accuracy a band of ±1 binomial standard error
    sqrt(p(1 − p)/n) around it shows how much n examples can wobble. Merges are markers at their projection
    on the line. The axes stay put while points stream in: t spans [0, 1], and each panel's y range covers
    the values so far and a minimum span around the value at A (`min_span`), growing but never shrinking.
    """
    counts = _counts(curves, tasks)
    labels = _labels(curves, tasks)
    metric_names = list(dict.fromkeys(f"{task} {labels[task, metric]}" for task, metric in tasks))
    # a language model's headline metric is its loss itself: one panel, not the same curve twice
    loss_only = bool(tasks) and all(metric == "loss" for _, metric in tasks)
    panels = ((1, "loss"),) if loss_only else ((1, None), (2, "loss"))
    # the loss panel is named by its loss when every task has the same kind ("next-token loss"), else "loss"
    loss_names = {labels[task, "loss"] for task, _ in tasks}
    loss_name = loss_names.pop() if len(loss_names) == 1 else "loss"
    if loss_only:
        titles = (_panel_title([loss_name], tasks[:1], counts),)
    else:
        titles = (_panel_title(metric_names, tasks, counts) if metric_names else "headline metric", loss_name)
    figure = make_subplots(rows=len(panels), cols=1, shared_xaxes=True, vertical_spacing=0.08, subplot_titles=titles)
    drawn: dict[int, list[float]] = {row: [] for row, _ in panels}
    anchors: dict[int, dict[tuple[str, str], tuple[float, float, str]]] = {row: {} for row, _ in panels}
    ts_drawn = [0.0, 1.0]
    legend = {"chord": False, "band": False}
    complete = [c for c in curves if _complete(c)]
    chorded = [c for c in complete if c["path"] == "line"] or complete[:1]
    for index, curve in enumerate(curves):
        points = [i for i in curve["items"] if i["kind"] == "point"]
        if not points:
            continue
        label = curve.get("label", curve["path"])
        dash = DASH.get(label, ("solid", "dot", "dash", "dashdot")[index % 4])
        ts = [p["t"] for p in points]
        for k, (task, metric) in enumerate(tasks):
            for row, key in ((row, key or metric) for row, key in panels):
                values = [p["scores"][task][key] for p in points]
                drawn[row] += values
                if ts[0] == 0.0:
                    n = counts.get(task, (None,))[0]
                    anchors[row].setdefault((task, key), (values[0], min_span(key, n, values[0]), key))
                if any(c is curve for c in chorded):
                    drawn[row] += _chord(figure, row, values[0], values[-1], legend, key, counts.get(task, (None,))[0])
                figure.add_trace(go.Scatter(
                    x=ts, y=values, mode="lines+markers", name=f"{task} ({label})",
                    legendgroup=f"{task}-{label}", showlegend=row == 1,
                    line={"color": _color(k), "dash": dash, "width": 2.5},
                    marker={"size": 6},
                    hovertemplate=f"{task} {labels[task, key]}: %{{y:.4f}}<br>t = %{{x:.2f}}<extra></extra>"),
                    row=row, col=1)
        merges = [i for i in curve["items"] if i["kind"] == "merge"]
        for j, m in enumerate(merges):
            ts_drawn.append(m["t"])
            for k, (task, metric) in enumerate(tasks):
                for row, key in ((row, key or metric) for row, key in panels):
                    drawn[row].append(m["scores"][task][key])
                    figure.add_trace(go.Scatter(
                        x=[m["t"]], y=[m["scores"][task][key]], mode="markers", name=m["method"],
                        legendgroup=f"merge-{m['method']}", showlegend=row == 1 and k == 0,
                        marker={"symbol": MERGE_SYMBOLS[j % len(MERGE_SYMBOLS)], "size": 13, "color": _color(k),
                                "line": {"width": 1.5, "color": "#111827"}},
                        hovertemplate=(f"{m['method']}<br>{task} {labels[task, key]}: %{{y:.4f}}<br>projection t = "
                                       f"%{{x:.3f}}<br>distance from the line: {m['off_line']:.3g}<extra></extra>")),
                        row=row, col=1)
    # t in [0, 1] with a little room for the end markers; wider only for a merge projected beyond an end
    low, high = min(ts_drawn), max(ts_drawn)
    figure.update_xaxes(range=[low - X_PAD * (high - low), high + X_PAD * (high - low)], autorange=False)
    for row, _ in panels:
        span = y_range(drawn[row], list(anchors[row].values()))
        if span is not None:
            figure.update_yaxes(range=span, autorange=False, row=row, col=1)
    figure.update_xaxes(title_text="t (0 = A, 1 = B)", row=len(panels), col=1)
    figure.update_layout(height=200 + 200 * len(panels), **LAYOUT)
    return figure


def _complete(curve: dict) -> bool:
    points = [i for i in curve["items"] if i["kind"] == "point"]
    return len(points) > 1 and points[0]["t"] == 0.0 and points[-1]["t"] == 1.0


def _chord(figure: go.Figure, row: int, start: float, end: float, legend: dict, key: str, n: int | None) -> list[float]:
    """The dashed chord between the end values (in the legend once) and, for an accuracy scored on n
    examples, the band of ±1 binomial standard error around it. Returns the values drawn."""
    drawn = [start, end]
    if key in BINOMIAL_METRICS and n:
        grid = [i / 20 for i in range(21)]
        chord = [(1 - t) * start + t * end for t in grid]
        error = [math.sqrt(max(p * (1 - p), 0.0) / n) for p in chord]
        upper = [p + e for p, e in zip(chord, error)]
        lower = [p - e for p, e in zip(chord, error)]
        figure.add_trace(go.Scatter(
            x=grid + grid[::-1], y=upper + lower[::-1], fill="toself", mode="lines", line={"width": 0},
            fillcolor="rgba(156, 163, 175, 0.18)", name=f"±1 s.e. around the chord (n = {n})",
            legendgroup="noise", showlegend=not legend["band"], hoverinfo="skip"), row=row, col=1)
        legend["band"] = True
        drawn += upper + lower
    figure.add_trace(go.Scatter(
        x=[0, 1], y=[start, end], mode="lines", name=CHORD, legendgroup="chord", showlegend=not legend["chord"],
        hoverinfo="skip", line={"color": "#9ca3af", "dash": "dash", "width": 1.5}), row=row, col=1)
    legend["chord"] = True
    return drawn


def _label(figure: go.Figure, x: float, y: float, text: str, *, above: bool) -> None:
    """A label in a light box, readable over any colour of the heatmap."""
    figure.add_annotation(x=x, y=y, text=text, showarrow=False, yshift=16 if above else -16, font={"size": 12},
                          bgcolor="rgba(255, 255, 255, 0.8)", borderpad=2)


def plane_figure(items: list[dict], task: str, metric: str, labels: dict[str, str]) -> go.Figure:
    """A heatmap of `task`'s `metric` on the plane through three checkpoints, with the checkpoints and
    the merges marked (merges at their projection, their distance from the plane in the hover text)."""
    cells = [i for i in items if i["kind"] == "cell"]
    figure = go.Figure()
    if cells:
        xs = sorted({c["x"] for c in cells})
        ys = sorted({c["y"] for c in cells})
        grid = [[None] * len(xs) for _ in ys]
        for c in cells:
            grid[ys.index(c["y"])][xs.index(c["x"])] = c["scores"][task][metric]
        figure.add_trace(go.Contour(x=xs, y=ys, z=grid, colorscale="Viridis", contours={"showlabels": True},
                                    colorbar={"title": metric}, connectgaps=False,
                                    hovertemplate=f"x %{{x:.2f}}, y %{{y:.2f}}<br>{metric} %{{z:.4f}}<extra></extra>"))
    vertices = [i for i in items if i["kind"] == "vertex"]
    if vertices:
        names = [labels.get(v["model"], v["model"]) for v in vertices]
        figure.add_trace(go.Scatter(
            x=[v["x"] for v in vertices], y=[v["y"] for v in vertices], mode="markers", text=names,
            name="checkpoints", marker={"size": 14, "color": "white", "line": {"width": 2, "color": "#111827"}},
            customdata=[v["scores"][task][metric] for v in vertices],
            hovertemplate=f"%{{text}}<br>{metric} %{{customdata:.4f}}<extra></extra>"))
        for v, name in zip(vertices, names):
            _label(figure, v["x"], v["y"], name, above=True)
    for j, m in enumerate(i for i in items if i["kind"] == "merge"):
        figure.add_trace(go.Scatter(
            x=[m["x"]], y=[m["y"]], mode="markers", name=m["method"],
            marker={"symbol": MERGE_SYMBOLS[j % len(MERGE_SYMBOLS)], "size": 13, "color": "#f59e0b",
                    "line": {"width": 1.5, "color": "#111827"}},
            hovertemplate=(f"{m['method']}<br>{metric} {m['scores'][task][metric]:.4f}<br>distance from the plane "
                           f"{m['off_plane']:.3g}<extra></extra>")))
        _label(figure, m["x"], m["y"], m["method"], above=False)
    figure.update_layout(height=560, xaxis_title="x (parameter distance along A→B)",
                         yaxis_title="y (parameter distance, orthogonal)", **LAYOUT)
    figure.update_yaxes(scaleanchor="x", scaleratio=1)
    return figure


def alignment_figure(maps: dict) -> go.Figure:
    """Cross-correlations of A's and B's units at one site, before and after B is permuted, for the first
    units; the matched pairs (the permutation matrix) are marked on the left panel."""
    figure = make_subplots(rows=1, cols=2, horizontal_spacing=0.08, subplot_titles=(
        f"before: mean matched corr. {maps['mean_before']:.3f}", f"after: mean matched corr. {maps['mean_after']:.3f}"))
    for col, key in ((1, "before"), (2, "after")):
        figure.add_trace(go.Heatmap(z=maps[key], zmin=-1, zmax=1, colorscale="RdBu", reversescale=True,
                                    showscale=col == 2, colorbar={"title": "corr."},
                                    hovertemplate="A unit %{y}, B unit %{x}: %{z:.3f}<extra></extra>"), row=1, col=col)
    if maps["matches"]:
        figure.add_trace(go.Scatter(x=[j for _, j in maps["matches"]], y=[i for i, _ in maps["matches"]], mode="markers",
                                    name="matched pair", marker={"symbol": "square-open", "size": 7, "color": "#111827"},
                                    hovertemplate="A unit %{y} ↔ B unit %{x}<extra></extra>"), row=1, col=1)
    shown = f"first {maps['shown']} of {maps['units']} units"
    figure.update_xaxes(title_text=f"B's units ({shown})", row=1, col=1)
    figure.update_xaxes(title_text="B's units, permuted", row=1, col=2)
    figure.update_yaxes(title_text="A's units", autorange="reversed", row=1, col=1)
    figure.update_yaxes(autorange="reversed", row=1, col=2)
    figure.update_layout(height=490, **{**TITLED, "legend": {"orientation": "h", "y": -0.2, "x": 0}})
    return figure


def head_cost_figure(maps: dict) -> go.Figure:
    """Head-Perm's cost: the summed matched correlation of every (A head, B head) pair, matches marked."""
    figure = go.Figure()
    cost = maps.get("head_cost")
    if cost:
        figure.add_trace(go.Heatmap(z=cost, colorscale="Viridis", colorbar={"title": "Σ corr."},
                                    hovertemplate="A head %{y}, B head %{x}: %{z:.2f}<extra></extra>"))
        order = maps.get("head_order") or []
        figure.add_trace(go.Scatter(x=order, y=list(range(len(order))), mode="markers", name="matched heads",
                                    marker={"symbol": "x", "size": 12, "color": "white",
                                            "line": {"width": 1, "color": "#111827"}}))
        figure.update_layout(title=f"head matching, {maps['site']}")
    else:
        figure.add_annotation(text="Head-Perm cost: pick an attention site (attn.<layer>) with head-perm matching",
                              showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    figure.update_xaxes(title_text="B's heads", dtick=1)
    figure.update_yaxes(title_text="A's heads", autorange="reversed", dtick=1)
    figure.update_layout(height=490, **{**TITLED, "legend": {"orientation": "h", "y": -0.2, "x": 0}})
    return figure


def similarity_figure(scores: list[dict[str, float]], weights: list[dict[str, float]], measure: str,
                      temperature: float) -> go.Figure:
    """Each source module's similarity to the target and its weight at this temperature (one bar per seed)."""
    figure = make_subplots(rows=1, cols=2, horizontal_spacing=0.12,
                           subplot_titles=(f"similarity ({measure}; higher = closer)", f"weight, T = {temperature:.3g}"))
    for seed, (s, w) in enumerate(zip(scores, weights)):
        names = list(s)
        figure.add_trace(go.Bar(x=names, y=[s[n] for n in names], name=f"seed {seed + 1}", marker_color=_color(seed),
                                legendgroup=str(seed), hovertemplate="%{x}: %{y:.4f}<extra></extra>"), row=1, col=1)
        figure.add_trace(go.Bar(x=names, y=[w[n] for n in names], name=f"seed {seed + 1}", marker_color=_color(seed),
                                legendgroup=str(seed), showlegend=False,
                                hovertemplate="%{x}: weight %{y:.3f}<extra></extra>"), row=1, col=2)
    figure.update_yaxes(range=[0, 1], row=1, col=2)
    figure.update_layout(height=450, barmode="group", **TITLED)
    return figure


def matrix_figure(matrix: dict, weights: dict[str, dict[str, float]], temperature: float) -> go.Figure:
    """Leave-one-out heatmaps: similarity and weight of every task's module (columns) for every target (rows)."""
    targets, modules = matrix["tasks"], matrix["modules"]
    sim = [[matrix["scores"][t].get(m) for m in modules] for t in targets]
    wts = [[weights[t].get(m) for m in modules] for t in targets]
    figure = make_subplots(rows=1, cols=2, horizontal_spacing=0.14, subplot_titles=(
        f"similarity ({matrix['measure']})", f"weight, T = {temperature:.3g}"))
    figure.add_trace(go.Heatmap(z=sim, x=modules, y=targets, colorscale="Viridis", colorbar={"x": 0.43},
                                hovertemplate="target %{y}, module %{x}: %{z:.4f}<extra></extra>"), row=1, col=1)
    figure.add_trace(go.Heatmap(z=wts, x=modules, y=targets, colorscale="Blues", zmin=0, zmax=1,
                                hovertemplate="target %{y}, module %{x}: weight %{z:.3f}<extra></extra>"), row=1, col=2)
    figure.update_yaxes(title_text="target task", row=1, col=1)
    figure.update_xaxes(title_text="source module")
    figure.update_layout(height=490, **TITLED)
    return figure


KNOWLEDGE_COLORS = [[0.0, "#ef4444"], [0.5, "#ef4444"], [0.5, "#10b981"], [1.0, "#10b981"]]  # wrong | right
KNOWLEDGE_ROWS = 200  # flipped examples drawn at most (the first by first loss)


def knowledge_figure(entry: dict, max_rows: int = KNOWLEDGE_ROWS) -> go.Figure:
    """Knowledge along a path (a curve's `knowledge()[task]`): per-point counts on top (forgotten: right at
    both ends, wrong here; lost / gained against A), and a heatmap of the examples that flip (rows, sorted
    by the point of first loss) by point (columns), green where answered correctly, red where not."""
    ts = entry["ts"]
    flipped = {f["index"] for f in entry["flips"]}
    rows = [i for i in entry["order"] if i in flipped][:max_rows]
    figure = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.3, 0.7], vertical_spacing=0.06,
                           subplot_titles=(f"{entry['task']} {entry['split']}: examples per point",
                                           f"{len(flipped)} of {entry['examples']} examples flip along the path"
                                           + (f" (first {len(rows)} by first loss)" if len(rows) < len(flipped)
                                              else ", sorted by first loss")))
    for k, (key, name) in enumerate((("forgotten", "forgotten (right at both ends)"), ("lost", "lost vs A"),
                                     ("gained", "gained vs A"))):
        figure.add_trace(go.Scatter(x=ts, y=[c[key] for c in entry["counts"]], mode="lines+markers", name=name,
                                    line={"color": ("#ef4444", "#f59e0b", "#10b981")[k]},
                                    hovertemplate=f"t %{{x:.2f}}: %{{y}} {key}<extra></extra>"), row=1, col=1)
    if rows:
        labels = [f"#{entry['indices'][i]}" for i in rows]
        figure.add_trace(go.Heatmap(z=[entry["matrix"][i] for i in rows], x=ts, y=labels, zmin=0, zmax=1,
                                    colorscale=KNOWLEDGE_COLORS, showscale=False, xgap=1, ygap=0,
                                    hovertemplate="example %{y}, t %{x:.2f}: %{z}<extra>1 = right</extra>"),
                         row=2, col=1)
        figure.update_yaxes(autorange="reversed", showticklabels=len(rows) <= 40, title_text="example", row=2,
                            col=1)
    barrier = entry["barrier_t"]
    for row in (1, 2):
        figure.add_vline(x=barrier, line={"color": "#111827", "dash": "dash", "width": 1}, row=row, col=1)
    figure.add_annotation(x=barrier, y=1, yref="paper", text="barrier", showarrow=False, yanchor="bottom",
                          font={"size": 11})
    figure.update_xaxes(title_text="t (A → B)", row=2, col=1)
    figure.update_yaxes(title_text="examples", row=1, col=1)
    figure.update_layout(height=640, **TITLED)
    return figure


def datamap_figure(rows: list[dict], title: str, marked: dict[int, str] | None = None) -> go.Figure:
    """A data map (Swayamdipta et al. 2020, Fig. 1): each training example at (variability, confidence),
    coloured by correctness. `rows` are `DataMap.table()` rows; `marked` maps example indices to a group
    name (e.g. "forgotten along the path"), drawn as open circles over the map."""
    figure = go.Figure()
    figure.add_trace(go.Scatter(
        x=[r["variability"] for r in rows], y=[r["confidence"] for r in rows], mode="markers", name="examples",
        text=[f"#{r['index']} ({r['region']})" for r in rows],
        marker={"size": 6, "color": [r["correctness"] for r in rows], "colorscale": "Viridis", "cmin": 0, "cmax": 1,
                "colorbar": {"title": "correctness"}, "opacity": 0.75},
        hovertemplate="%{text}<br>variability %{x:.3f}<br>confidence %{y:.3f}<br>correctness "
                      "%{marker.color:.2f}<extra></extra>"))
    by_index = {r["index"]: r for r in rows}
    groups: dict[str, list[dict]] = {}
    for index, group in (marked or {}).items():
        if index in by_index:
            groups.setdefault(group, []).append(by_index[index])
    for k, (group, members) in enumerate(groups.items()):
        figure.add_trace(go.Scatter(
            x=[r["variability"] for r in members], y=[r["confidence"] for r in members], mode="markers",
            name=f"{group} ({len(members)})", text=[f"#{r['index']}" for r in members],
            marker={"size": 11, "symbol": "circle-open", "color": ("#ef4444", "#111827", "#f59e0b")[k % 3],
                    "line": {"width": 2}},
            hovertemplate=f"%{{text}} ({group})<extra></extra>"))
    figure.update_layout(height=520, title={"text": title, "x": 0}, xaxis_title="variability (std of p(gold))",
                         yaxis_title="confidence (mean p(gold))", **TITLED)
    figure.update_yaxes(range=[-0.02, 1.02])
    return figure


def data_amount_figure(rows: list[dict], vanilla: float | None = None) -> go.Figure:
    """Loss barrier of the aligned line against the number of tokens the alignment's activation statistics
    read (log axis), one line per merge type (`rows`: {"label", "tokens", "loss_barrier"}); the barrier of
    plain (vanilla) interpolation as a dashed reference."""
    figure = go.Figure()
    labels = list(dict.fromkeys(r["label"] for r in rows))
    for i, label in enumerate(labels):
        mine = sorted((r for r in rows if r["label"] == label), key=lambda r: r["tokens"])
        figure.add_trace(go.Scatter(x=[r["tokens"] for r in mine], y=[r["loss_barrier"] for r in mine],
                                    mode="lines+markers", name=label, line={"color": _color(i)},
                                    hovertemplate="%{x} tokens: barrier %{y:.4f}<extra>" + label + "</extra>"))
    if vanilla is not None:
        figure.add_hline(y=vanilla, line={"dash": "dash", "color": "#6b7280"},
                         annotation_text=f"vanilla averaging {vanilla:.3f}", annotation_position="top right")
    figure.update_xaxes(type="log", title_text="tokens read for the activation statistics")
    figure.update_yaxes(title_text="loss barrier (above the chord)")
    figure.update_layout(height=450, **LAYOUT)
    return figure


def sweep_figure(rows: list[dict], dims: list[str], tasks: list[str], axes: dict[str, list] | None = None
                 ) -> go.Figure:
    """A sweep's trials as they finish: a line for one varied setting, a heatmap for two (a grid, whose
    `axes` are known before any trial ends; a scatter coloured by the objective for sampled points),
    parallel coordinates for more; the objective throughout. Two tasks' trade-off: `pareto_figure`."""
    axes = axes or {}
    scored = [r for r in rows if isinstance(r.get("objective"), float) and math.isfinite(r["objective"])]
    figure = go.Figure()
    figure.update_layout(**TITLED, title="Objective per trial" + (f" ({len(scored)} scored)" if scored else ""))
    if len(dims) == 2 and all(d in axes for d in dims):
        x, y = dims
        xs, ys = axes[x], axes[y]
        z = [[None] * len(xs) for _ in ys]
        for r in scored:
            if r[x] in xs and r[y] in ys:
                z[ys.index(r[y])][xs.index(r[x])] = r["objective"]
        figure.add_trace(go.Heatmap(x=[_tick(v) for v in xs], y=[_tick(v) for v in ys], z=z, colorscale="Viridis",
                                    colorbar={"title": "objective"}, hoverongaps=False, texttemplate="%{z:.3f}"))
        figure.update_layout(xaxis_title=x, yaxis_title=y, showlegend=False)
        return figure
    if not scored or not dims:
        return figure
    numeric = [d for d in dims if all(isinstance(r.get(d), (int, float)) for r in scored)]
    if len(dims) == 1:
        d = dims[0]
        ordered = sorted(scored, key=lambda r: (r[d] if d in numeric else str(r[d])))
        figure.add_trace(go.Scatter(x=[r[d] for r in ordered], y=[r["objective"] for r in ordered],
                                    mode="lines+markers", line={"color": PALETTE[0]}, name="objective"))
        figure.update_layout(xaxis_title=d, yaxis_title="objective", showlegend=False)
        return figure
    if len(dims) == 2:
        x, y = dims
        xs, ys = sorted({r[x] for r in scored}, key=str), sorted({r[y] for r in scored}, key=str)
        if x in numeric:
            xs = sorted({r[x] for r in scored})
        if y in numeric:
            ys = sorted({r[y] for r in scored})
        if len(xs) * len(ys) <= 2 * len(scored):  # a grid (or most of one): a heatmap, its holes left blank
            z = [[None] * len(xs) for _ in ys]
            for r in scored:
                z[ys.index(r[y])][xs.index(r[x])] = r["objective"]
            figure.add_trace(go.Heatmap(x=[_tick(v) for v in xs], y=[_tick(v) for v in ys], z=z, colorscale="Viridis",
                                        colorbar={"title": "objective"}, hoverongaps=False,
                                        texttemplate="%{z:.3f}"))
        else:
            figure.add_trace(go.Scatter(x=[r[x] for r in scored], y=[r[y] for r in scored], mode="markers",
                                        marker={"color": [r["objective"] for r in scored], "colorscale": "Viridis",
                                                "size": 11, "showscale": True, "colorbar": {"title": "objective"}}))
        figure.update_layout(xaxis_title=x, yaxis_title=y, showlegend=False)
        return figure
    columns = [{"label": d, "values": [r[d] for r in scored]} for d in numeric]
    columns.append({"label": "objective", "values": [r["objective"] for r in scored]})
    figure.add_trace(go.Parcoords(dimensions=columns, line={"color": [r["objective"] for r in scored],
                                                            "colorscale": "Viridis", "showscale": True}))
    return figure


def _tick(value) -> str:
    """A grid point as an axis label: 0.7666666667 -> 0.767."""
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def pareto_figure(rows: list[dict], tasks: list[str]) -> go.Figure:
    """Two tasks' scores of every trial, the trials no other trial beats on both marked and joined."""
    a, b = tasks[:2]
    scored = [r for r in rows if isinstance(r.get(a), float) and isinstance(r.get(b), float)]
    front = [r for r in scored if not any(o[a] >= r[a] and o[b] >= r[b] and (o[a] > r[a] or o[b] > r[b])
                                          for o in scored)]
    front.sort(key=lambda r: r[a])
    figure = go.Figure()
    figure.add_trace(go.Scatter(x=[r[a] for r in scored], y=[r[b] for r in scored], mode="markers", name="trials",
                                marker={"color": "#94a3b8", "size": 9}, text=[r["trial"] for r in scored]))
    figure.add_trace(go.Scatter(x=[r[a] for r in front], y=[r[b] for r in front], mode="lines+markers",
                                name="Pareto front", marker={"color": PALETTE[0], "size": 11},
                                text=[r["trial"] for r in front]))
    figure.update_layout(**TITLED, title=f"{a} against {b}", xaxis_title=a, yaxis_title=b)
    return figure
