"""Plotly figures built from the engine's plain results (dicts of floats). No tensor math here."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

# One colour per task, one dash per path kind: a line and a Bezier curve of the same task read together.
PALETTE = ("#4f46e5", "#0ea5e9", "#f59e0b", "#10b981", "#ef4444", "#8b5cf6", "#ec4899")
DASH = {"line": "solid", "bezier": "dot"}
MERGE_SYMBOLS = ("diamond", "star", "square", "triangle-up", "x", "cross", "pentagon", "hexagon")
LAYOUT = {"template": "plotly_white", "font": {"size": 13}, "margin": {"l": 60, "r": 20, "t": 40, "b": 40},
          "legend": {"orientation": "h", "yanchor": "top", "y": -0.12, "x": 0}}


def _color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def curve_figure(curves: list[dict], tasks: list[tuple[str, str]]) -> go.Figure:
    """Metric (top) and loss (bottom) along one or more paths between the same two checkpoints.

    `curves`: [{"path": "line" | "bezier", "items": [curve items as the engine yields them]}];
    `tasks`: [(task, headline metric)]. The grey dashed line joins each curve's end values: the barrier
    is the largest gap between it and the curve. Merges are markers at their projection on the line.
    """
    metrics = " · ".join(dict.fromkeys(f"{task} {metric}" for task, metric in tasks)) or "headline metric"
    figure = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                           subplot_titles=(metrics, "loss"))
    for curve in curves:
        points = [i for i in curve["items"] if i["kind"] == "point"]
        if not points:
            continue
        ts = [p["t"] for p in points]
        for k, (task, metric) in enumerate(tasks):
            for row, key in ((1, metric), (2, "loss")):
                values = [p["scores"][task][key] for p in points]
                figure.add_trace(go.Scatter(
                    x=ts, y=values, mode="lines+markers", name=f"{task} ({curve['path']})",
                    legendgroup=f"{task}-{curve['path']}", showlegend=row == 1,
                    line={"color": _color(k), "dash": DASH.get(curve["path"], "solid"), "width": 2.5},
                    marker={"size": 6}, hovertemplate=f"{task} {key}: %{{y:.4f}}<br>t = %{{x:.2f}}<extra></extra>"),
                    row=row, col=1)
                if len(points) > 1 and points[-1]["t"] == 1.0 and curve["path"] == "line":
                    figure.add_trace(go.Scatter(
                        x=[0, 1], y=[values[0], values[-1]], mode="lines", showlegend=False, hoverinfo="skip",
                        line={"color": "#9ca3af", "dash": "dash", "width": 1}), row=row, col=1)
        merges = [i for i in curve["items"] if i["kind"] == "merge"]
        for j, m in enumerate(merges):
            for k, (task, metric) in enumerate(tasks):
                for row, key in ((1, metric), (2, "loss")):
                    figure.add_trace(go.Scatter(
                        x=[m["t"]], y=[m["scores"][task][key]], mode="markers", name=m["method"],
                        legendgroup=f"merge-{m['method']}", showlegend=row == 1 and k == 0,
                        marker={"symbol": MERGE_SYMBOLS[j % len(MERGE_SYMBOLS)], "size": 13, "color": _color(k),
                                "line": {"width": 1.5, "color": "#111827"}},
                        hovertemplate=(f"{m['method']}<br>{task} {key}: %{{y:.4f}}<br>projection t = %{{x:.3f}}"
                                       f"<br>distance from the line: {m['off_line']:.3g}<extra></extra>")),
                        row=row, col=1)
    figure.update_xaxes(title_text="t (0 = A, 1 = B)", row=2, col=1)
    figure.update_layout(height=600, **LAYOUT)
    return figure


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
        figure.add_trace(go.Scatter(
            x=[v["x"] for v in vertices], y=[v["y"] for v in vertices], mode="markers+text",
            text=[labels.get(v["model"], v["model"]) for v in vertices], textposition="top center",
            name="checkpoints", marker={"size": 14, "color": "white", "line": {"width": 2, "color": "#111827"}},
            customdata=[v["scores"][task][metric] for v in vertices],
            hovertemplate=f"%{{text}}<br>{metric} %{{customdata:.4f}}<extra></extra>"))
    for j, m in enumerate(i for i in items if i["kind"] == "merge"):
        figure.add_trace(go.Scatter(
            x=[m["x"]], y=[m["y"]], mode="markers+text", text=[m["method"]], textposition="bottom center",
            name=m["method"], marker={"symbol": MERGE_SYMBOLS[j % len(MERGE_SYMBOLS)], "size": 13, "color": "#f59e0b",
                                      "line": {"width": 1.5, "color": "#111827"}},
            hovertemplate=(f"{m['method']}<br>{metric} {m['scores'][task][metric]:.4f}<br>distance from the plane "
                           f"{m['off_plane']:.3g}<extra></extra>")))
    figure.update_layout(height=560, xaxis_title="x (parameter distance along A→B)",
                         yaxis_title="y (parameter distance, orthogonal)", **LAYOUT)
    figure.update_yaxes(scaleanchor="x", scaleratio=1)
    return figure
