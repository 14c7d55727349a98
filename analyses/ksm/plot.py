"""The KSM model's pictures (``trace-analyze --ksm --plot FILE``): savings over time, savings
against scan rate, and the model against the guest's own KSM counters when the trace has them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from memtrace.analyses.base import Plot
from memtrace.analyses.timeline import pages_to_mib

if TYPE_CHECKING:
    from memtrace.analyses.base import Result
    from memtrace.analyses.ksm.analysis import KsmAnalysis


def ksm_plots(a: KsmAnalysis, r: Result) -> list[Plot]:
    """The panels for ``a``'s result ``r``; series on the report's time axis."""
    ps = a.page_size
    x_of = a.ctx.time.x
    out: list[Plot] = []
    s = r.tables["series"]
    if s.rows and a.models:
        x = x_of(np.array(s.column("t"), dtype=np.float64))

        def savings(ax: Any) -> None:
            ax.plot(x, [pages_to_mib(v, ps) for v in s.column("scope_oracle")], "k--",
                    label="oracle (scope)", drawstyle="steps-post")
            ax.plot(x, [pages_to_mib(v, ps) for v in s.column("saved_pages")],
                    label=f"KSM {a.models[0].p.label}", drawstyle="steps-post")
            if "hinted_saved_pages" in s.columns:
                ax.plot(x, [pages_to_mib(v, ps) for v in s.column("hinted_saved_pages")],
                        label=f"KSM {a.models[1].p.label}", drawstyle="steps-post")

        out.append(Plot("ksm-savings", "KSM model: memory saved over time", savings,
                        ylabel="memory saved (MiB)"))
    sw = r.tables["sweep"]
    if sw.rows:
        j = sw.columns.index

        def rate(ax: Any) -> None:
            for scanner, mark in (("linear", "o-"), ("hinted", "s--")):
                pts = sorted((row[j("scan_rate")], row[j("saved_mean")]) for row in sw.rows
                             if row[j("scanner")] == scanner)
                if pts:
                    ax.plot([p for p, _ in pts], [pages_to_mib(v, ps) for _, v in pts], mark,
                            label=scanner)
            orc = [row for row in sw.rows if row[j("scanner")] == "ceiling"]
            if orc:
                ax.axhline(pages_to_mib(orc[0][j("saved_mean")], ps), color="black", ls="--",
                           label="oracle (scope)")
            ax.set_xscale("log")
            ax.set_xlabel("scan rate (pages per guest second)")

        out.append(Plot("ksm-rate", "KSM model: mean memory saved against scan rate", rate,
                        ylabel="mean memory saved (MiB)", time_axis=False))
    rows = [x for x in a.compare_rows if x[1] == "pages_sharing"]
    if rows and a.models:
        xk = x_of(np.array([x[0] for x in rows], dtype=np.float64))

        def kernel(ax: Any) -> None:
            ax.plot(xk, [x[2] for x in rows], "k.-", label="kernel (COUNTER ksm.*)")
            ax.plot(xk, [x[3] for x in rows], "x--", label=f"model {a.models[0].p.label}")

        out.append(Plot("ksm-kernel", "KSM model against the guest's own KSM", kernel,
                        ylabel="pages_sharing"))
    return out
