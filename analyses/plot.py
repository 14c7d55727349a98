"""Draw sharing over time: the four figures and the oracle on one chart (matplotlib, optional)."""

from __future__ import annotations

from memtrace.analyses.base import Result
from memtrace.analyses.timeline import pages_to_mib


class PlotError(Exception):
    pass


def plot(path: str, sharing: Result | None, oracle: Result | None, clock_unit: str,
         title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError("matplotlib is not installed; install it with "
                        "pip install 'memtrace[plot]'") from None
    fig, ax = plt.subplots(figsize=(10, 5.5))
    labels = {"no_sharing": "no sharing", "mmap_fork": "mmap/fork",
              "ksm_hint_all": "KSM hint all", "full_cbps": "full CBPS (samples)"}
    if sharing is not None:
        s = sharing.tables["series"]
        t = [r[0] for r in s.rows]
        for col, lab in labels.items():
            i = s.columns.index(col)
            ax.plot(t, [pages_to_mib(r[i]) for r in s.rows], label=lab, drawstyle="steps-post",
                    marker="." if len(t) < 60 else None)
    if oracle is not None:
        o = oracle.tables["series"]
        xs: list[float] = []
        ys: list[float] = []
        for r in o.rows:
            xs += [r[0], r[1]]
            ys += [pages_to_mib(r[2])] * 2
        ax.plot(xs, ys, color="black", linewidth=1, linestyle="--",
                label="oracle lower bound (every change)")
    ax.set_xlabel(f"time ({clock_unit})")
    ax.set_ylabel("memory (MiB)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except OSError as e:
        raise PlotError(f"cannot write {path}: {e.strerror}") from None
    finally:
        plt.close(fig)
