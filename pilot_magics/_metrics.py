"""A training cell's metrics as one table and a small loss plot (hand-made SVG).

``MetricsBoard`` is fed by ``TrainRun`` (``_train_view.py``) with each record that
``pilot.train.report`` sent (``{"rank": .., "time": .., **metrics}``, as in ``job.metrics``)
and with each restart of the group; it draws, and keeps no clock and shows nothing itself, so a
test can draw it without a kernel.

- The table: one row per rank holding that rank's latest report (after a restart, the resumed
  steps overwrite it), the metrics as columns in the order they first appeared (``step``
  first), and how many reports the rank sent, which shows a rank that has gone quiet.
- The plot (``plot_svg``), once reports carry a numeric ``step`` and ``loss``: one line per
  rank of loss against step. A step reported again (a restart resumed from an older
  checkpoint) replaces its earlier point, so a resumed run continues its line instead of
  drawing back over it; a dashed line marks the first step reported after each restart. Each
  line is thinned evenly to at most ``PLOT_POINTS`` points, so the SVG stays a few kB however
  long the training runs.
"""

from __future__ import annotations

import html
from typing import Any

__all__ = ["MetricsBoard"]

PLOT_W_PX, PLOT_H_PX = 420, 180
MARGIN_PX = {"left": 52, "right": 12, "top": 20, "bottom": 26}
PLOT_POINTS = 300  # per line
LEGEND_RANKS = 8  # ranks named in the legend; the rest are drawn, unnamed
COLORS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
RESERVED = ("rank", "time")  # set by pilot.train.report, not metrics of the user's


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class MetricsBoard:
    """The metrics of one training job, as they arrive."""

    def __init__(self) -> None:
        self.latest: dict[int, dict[str, Any]] = {}  # rank -> its latest report
        self.counts: dict[int, int] = {}  # rank -> reports
        self.columns: list[str] = []
        self.losses: dict[int, dict[float, float]] = {}  # rank -> step -> loss
        self.restart_steps: list[float] = []
        self.restarts = 0
        self._restarted = False

    def add(self, record: dict[str, Any]) -> None:
        """One report of one rank."""
        rank = int(record.get("rank", -1))
        self.latest[rank] = record
        self.counts[rank] = self.counts.get(rank, 0) + 1
        for key in record:
            if key not in RESERVED and key not in self.columns:
                self.columns.insert(0 if key == "step" else len(self.columns), key)
        step, loss = _number(record.get("step")), _number(record.get("loss"))
        if step is None:
            return
        if self._restarted:
            self.restart_steps.append(step)
            self._restarted = False
        if loss is not None:
            self.losses.setdefault(rank, {})[step] = loss

    def restarted(self) -> None:
        """The group stopped and restarts: the next step reported is marked on the plot."""
        self.restarts += 1
        self._restarted = True

    @property
    def reports(self) -> int:
        return sum(self.counts.values())

    # -- the table --------------------------------------------------------------------------

    def _rows(self) -> list[list[str]]:
        return [
            [str(rank)]
            + [_cell(self.latest[rank].get(c, "")) for c in self.columns]
            + [str(self.counts[rank])]
            for rank in sorted(self.latest)
        ]

    def table_text(self) -> str:
        """The table as aligned plain text ("" before the first report)."""
        if not self.latest:
            return ""
        rows = [["rank", *self.columns, "reports"], *self._rows()]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        return "\n".join(
            "  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in rows
        )

    def table_html(self) -> str:
        """The table as HTML ("" before the first report); every value escaped."""
        if not self.latest:
            return ""
        cell = 'style="padding:1px 8px;text-align:right"'
        head = "".join(
            f"<th {cell}>{html.escape(c)}</th>" for c in ["rank", *self.columns, "reports"]
        )
        body = "".join(
            "<tr>" + "".join(f"<td {cell}>{html.escape(v)}</td>" for v in row) + "</tr>"
            for row in self._rows()
        )
        return (
            '<table style="font-family:monospace;border-collapse:collapse">'
            f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        )

    # -- the plot ---------------------------------------------------------------------------

    def plot_svg(self) -> str:
        """Loss against step as an SVG document ("" until a report has both)."""
        lines = {r: sorted(points.items()) for r, points in self.losses.items() if points}
        if not lines:
            return ""
        steps = [s for points in lines.values() for s, _ in points]
        losses = [v for points in lines.values() for _, v in points]
        x0, x1 = _span(min(steps), max(steps))
        y0, y1 = _span(min(losses), max(losses))
        left, top = MARGIN_PX["left"], MARGIN_PX["top"]
        w = PLOT_W_PX - left - MARGIN_PX["right"]
        h = PLOT_H_PX - top - MARGIN_PX["bottom"]

        def xy(step: float, loss: float) -> str:
            x = left + (step - x0) / (x1 - x0) * w
            y = top + (y1 - loss) / (y1 - y0) * h
            return f"{x:.1f},{y:.1f}"

        parts = [
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{PLOT_W_PX}" height="{PLOT_H_PX}" '
            f'viewBox="0 0 {PLOT_W_PX} {PLOT_H_PX}" font-family="monospace" font-size="10">',
            f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#999"/>',
            f'<text x="{left}" y="{top - 6}">loss</text>',
            f'<text x="{left - 4}" y="{top + 4}" text-anchor="end">{y1:.3g}</text>',
            f'<text x="{left - 4}" y="{top + h}" text-anchor="end">{y0:.3g}</text>',
            f'<text x="{left}" y="{top + h + 14}">{x0:g}</text>',
            f'<text x="{left + w}" y="{top + h + 14}" text-anchor="end">{x1:g}</text>',
            f'<text x="{left + w / 2}" y="{top + h + 14}" text-anchor="middle">step</text>',
        ]
        for step in self.restart_steps:
            if x0 <= step <= x1:
                x = xy(step, y1).split(",")[0]
                parts.append(
                    f'<line x1="{x}" y1="{top}" x2="{x}" y2="{top + h}" stroke="#888" '
                    'stroke-dasharray="3,3"><title>restart</title></line>'
                )
        for i, (rank, points) in enumerate(sorted(lines.items())):
            color = COLORS[i % len(COLORS)]
            shown = _thin(points, PLOT_POINTS)
            path = " ".join(xy(s, v) for s, v in shown)
            parts.append(
                f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.5">'
                f"<title>rank {rank}</title></polyline>"
            )
            last_x, last_y = xy(*shown[-1]).split(",")
            parts.append(f'<circle cx="{last_x}" cy="{last_y}" r="2" fill="{color}"/>')
            if len(lines) > 1 and i < LEGEND_RANKS:
                parts.append(
                    f'<text x="{left + w - 4}" y="{top + 12 + 11 * i}" text-anchor="end" '
                    f'fill="{color}">rank {rank}</text>'
                )
        parts.append("</svg>")
        return "".join(parts)


def _span(low: float, high: float) -> tuple[float, float]:
    """An axis range that holds low..high and is never empty."""
    if high > low:
        return low, high
    pad = abs(low) * 0.1 or 1.0
    return low - pad, high + pad


def _thin(points: list[tuple[float, float]], most: int) -> list[tuple[float, float]]:
    """At most ``most`` of ``points``, evenly chosen, the first and the last kept."""
    if len(points) <= most:
        return points
    n = len(points)
    return [points[round(i * (n - 1) / (most - 1))] for i in range(most)]
