"""``--plot-ksm``: savings over time, savings against scan rate, and the model against the guest's
own KSM counters when the trace has them."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from memtrace.analyses.timeline import pages_to_mib

if TYPE_CHECKING:
    from memtrace.analyses.base import Result
    from memtrace.analyses.ksm.analysis import KsmAnalysis


def plot_ksm(a: KsmAnalysis, r: Result) -> None:
    """Draw the figures of ``a``'s result ``r`` into ``a.plot_path`` (a note in ``r`` if that
    fails)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        r.notes.append("--plot-ksm: matplotlib is not installed")
        return
    ps = a.page_size
    ps_rows = [x for x in a.compare_rows if x[1] == "pages_sharing"]
    if ps_rows:
        fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(19, 5))
        g0 = a.gclock.guest(a.t_first or 0)
        gt = [x[5] - g0 for x in ps_rows]
        a3.plot(gt, [x[2] for x in ps_rows], "k.-", label="kernel (COUNTER ksm.*)")
        a3.plot(gt, [x[3] for x in ps_rows], "x--", label=f"model {a.models[0].p.label}")
        a3.set_xlabel("guest time (s)")
        a3.set_ylabel("pages_sharing")
        a3.set_title("model against the guest's KSM")
        a3.grid(alpha=0.3)
        a3.legend()
    else:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 5))
    s = r.tables["series"]
    t = [a.gclock.span(a.t_first or 0, row[0]) for row in s.rows]
    ci = s.columns.index
    a1.plot(t, [pages_to_mib(row[ci("scope_oracle")], ps) for row in s.rows], "k--",
            label="oracle (scope)", drawstyle="steps-post")
    a1.plot(t, [pages_to_mib(row[ci("saved_pages")], ps) for row in s.rows],
            label=f"KSM {a.models[0].p.label}", drawstyle="steps-post")
    if "hinted_saved_pages" in s.columns:
        a1.plot(t, [pages_to_mib(row[ci("hinted_saved_pages")], ps) for row in s.rows],
                label=f"KSM {a.models[1].p.label}", drawstyle="steps-post")
    a1.set_xlabel("guest time (s)")
    a1.set_ylabel("memory saved (MiB)")
    a1.set_title("savings over time")
    a1.grid(alpha=0.3)
    a1.legend()
    sw = r.tables["sweep"]
    j = sw.columns.index
    for scanner, mark in (("linear", "o-"), ("hinted", "s--")):
        pts = sorted((row[j("scan_rate")], row[j("saved_mean")]) for row in sw.rows
                     if row[j("scanner")] == scanner)
        if pts:
            a2.plot([x for x, _ in pts], [pages_to_mib(y, ps) for _, y in pts], mark,
                    label=scanner)
    orc = [row for row in sw.rows if row[j("scanner")] == "ceiling"]
    if orc:
        a2.axhline(pages_to_mib(orc[0][j("saved_mean")], ps), color="black", ls="--",
                   label="oracle (scope)")
    a2.set_xscale("log")
    a2.set_xlabel("scan rate (pages per guest second)")
    a2.set_ylabel("mean memory saved (MiB)")
    a2.set_title("savings against scan rate")
    a2.grid(alpha=0.3)
    a2.legend()
    fig.tight_layout()
    try:
        fig.savefig(a.plot_path, dpi=110)
        print(f"KSM plot written to {a.plot_path}", file=sys.stderr)
    except OSError as e:
        r.notes.append(f"--plot-ksm: cannot write {a.plot_path}: {e.strerror}")
    finally:
        plt.close(fig)
