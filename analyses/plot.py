"""Draw the analyses' pictures into one PNG: a panel per picture (matplotlib, optional).

Each analysis offers its pictures through ``Analysis.plots(result)`` (``memtrace.analyses.base
.Plot``); pictures naming the same panel share one set of axes, so the four figures and the
oracle are drawn over each other. Panels on the time axis share it: guest seconds when the
trace has the guest clock, its clock unit otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from memtrace.analyses.base import Analysis, Context, Plot


class PlotError(Exception):
    pass


def check_matplotlib() -> None:
    """Fail before the replay, not after it, when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotError("matplotlib is not installed; install it with "
                        "pip install 'memtrace[plot]'") from None


def draw(path: str, offered: Sequence[tuple[Analysis, list[Plot]]], ctx: Context,
         title: str) -> None:
    """Draw every offered plot into ``path``, one panel per distinct ``Plot.panel``."""
    check_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[str, list[Plot]] = {}
    for _analysis, plots in offered:
        for p in plots:
            panels.setdefault(p.panel, []).append(p)
    if not panels:
        raise PlotError("none of the chosen analyses draws a picture (--sharing, --oracle "
                        "and --ksm do)")
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 4.8 * len(panels)), squeeze=False,
                             layout="constrained")
    for ax, (_name, plots) in zip(axes[:, 0], panels.items(), strict=True):
        for p in plots:
            p.draw(ax)
        first = plots[0]
        ax.set_title(first.title)
        if first.ylabel:
            ax.set_ylabel(first.ylabel)
        if first.time_axis:
            ax.set_xlabel(f"time ({ctx.time.axis})")
            shade_phases(ax, ctx)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    fig.suptitle(title)
    try:
        fig.savefig(path, dpi=110)
    except OSError as e:
        raise PlotError(f"cannot write {path}: {e.strerror}") from None
    finally:
        plt.close(fig)


def steps(ax: Any, x: Sequence[float], y: Sequence[float], **kw: Any) -> None:
    """A step line (each value holds until the next x), with markers when points are few."""
    ax.plot(x, y, drawstyle="steps-post", marker="." if len(x) < 60 else None, **kw)


def shade_phases(ax: Any, ctx: Context) -> None:
    """The workload's marked phases as labelled spans behind a time-axis panel."""
    phases = [p for p in ctx.trace.phases() if p.name]
    tb = ctx.time
    for i, p in enumerate(phases):
        x0, x1 = float(tb.x(p.t_start)), float(tb.x(p.t_end))
        ax.axvspan(x0, x1, color="tab:gray" if i % 2 else "tab:olive", alpha=0.08, lw=0,
                   label=None, gid=f"phase:{p.name}")
        ax.text((x0 + x1) / 2, 0.98, p.name, transform=ax.get_xaxis_transform(),
                ha="center", va="top", fontsize="small", color="dimgray", gid=f"phase:{p.name}")
