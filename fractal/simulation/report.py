"""Presenting simulation results: a text table per region and overall, and a PNG of demand and capacity."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fractal.simulation.engine import RegionResult, SimulationResult

COLUMNS = (
    ("sessions", "sessions", "d"),
    ("p50 s", "wait_p50_s", ".0f"),
    ("p95 s", "wait_p95_s", ".0f"),
    ("p99 s", "wait_p99_s", ".0f"),
    ("refused", "refused_share", ".2%"),
    ("busy h", "busy_hours", ".1f"),
    ("idle h", "idle_hours", ".1f"),
    ("launches", "launches", "d"),
    ("terminations", "terminations", "d"),
    ("cost $", "cost_usd", ".2f"),
)


def _cells(row: RegionResult) -> list[str]:
    return [format(getattr(row, attribute), spec) for _, attribute, spec in COLUMNS]


def format_table(results: Sequence[SimulationResult], *, per_region: bool = True) -> str:
    """Every policy's overall line (and, with ``per_region``, one line per region under it)."""
    header = ["policy", "region", *(title for title, _, _ in COLUMNS)]
    lines: list[list[str]] = []
    for result in results:
        lines.append([result.policy, "overall", *_cells(result.overall)])
        if per_region and len(result.regions) > 1:
            lines += [["", region.region, *_cells(region)] for region in result.regions]
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]

    def render(row: list[str]) -> str:
        cells = enumerate(zip(row, widths, strict=True))
        return "  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in cells)

    return "\n".join([render(header), render(["-" * w for w in widths]), *(render(row) for row in lines)])


def plot(results: Sequence[SimulationResult], path: Path, *, title: str = "Fractal fleet simulation") -> Path:
    """One panel per policy: demand (live mandelboxes plus waiting users), ACTIVE capacity and free slots over the
    run, with each policy's p95 wait and instance-hours in the panel title. Needs matplotlib (extra ``sim``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(results), 1, figsize=(11, 3.2 * len(results)), sharex=True, squeeze=False)
    for axis, result in zip(axes[:, 0], results, strict=True):
        times = [s.at for s in result.series]
        axis.plot(times, [s.demand for s in result.series], label="demand (live + waiting)", color="#d62728")
        axis.plot(times, [s.capacity for s in result.series], label="capacity (ACTIVE slots)", color="#1f77b4")
        axis.fill_between(times, 0, [s.free for s in result.series], label="free slots", color="#2ca02c", alpha=0.3)
        o = result.overall
        axis.set_title(
            f"{result.policy}: p95 wait {o.wait_p95_s:.0f} s, refused {o.refused_share:.1%}, "
            f"{o.busy_hours:.0f} busy + {o.idle_hours:.0f} idle instance-h, ${o.cost_usd:.0f}",
            fontsize=10,
        )
        axis.set_ylabel("mandelboxes")
        axis.grid(alpha=0.3)
        axis.legend(loc="upper left", fontsize=8)
    hours = mdates.DateFormatter("%H:%M")  # type: ignore[no-untyped-call]
    axes[-1, 0].xaxis.set_major_formatter(hours)
    axes[-1, 0].set_xlabel("UTC")
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path
