"""The thesis study's report: Tables 5.1-5.3 beside the published figures, what the thesis
could not measure, and figures in the style of its Figures 5.3-5.5 (Markdown + PNG).

Every figure of Tables 5.1 and 5.3 is the median over the runs of a configuration of the
value at the sample with the most frames mapped (trace-analyze's ``figures_at_peak``, the
moment a dump tool would have taken), relative to the median mmap/fork of the one-instance
case, as the thesis normalises. Beside them, from the same traces, the columns a snapshot tool
cannot give: the oracle's time-weighted mean and its minimum (the least memory any page-granular
deduplication could have used, over time), the share of the page-time of sharing that snapshots
at the default interval never see, and the KSM model at default settings: its time-weighted
mean memory and the share of the oracle's savings it reaches.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from memtrace.studies.thesis import (
    FIGURE_NAMES,
    FIGURES,
    REAL,
    TABLE_5_1,
    TABLE_5_1_BASE_MIB,
    TABLE_5_2,
    TABLE_5_3,
    TABLE_5_3_BASE_MIB,
)

MIB_PAGES = 256  # 4 KiB pages per MiB
#: Table 5.1's columns: (workload, n)
COLUMNS_5_1 = [("terminal-server", 1), ("terminal-server", 2), ("zero-install", 2),
               ("terminal-server", 3), ("zero-install", 3)]
HEAD_5_1 = ["1 user", "2 users terminal", "2 users zero-install", "3 users terminal",
            "3 users zero-install"]


def median(xs: Sequence[float | None]) -> float | None:
    v = [x for x in xs if x is not None]
    return statistics.median(v) if v else None


class Runs:
    """The finished runs grouped by configuration (workload, n)."""

    def __init__(self, runs: Sequence[Any]) -> None:
        self.by: dict[tuple[str, int], list[dict[str, Any]]] = {}
        self.failed: dict[tuple[str, int], int] = {}
        self.scenario: dict[str, str] = {}
        for r in runs:
            cfg = (r.spec.workload, int(r.spec.params.get("n", 1)))
            self.scenario[r.spec.workload] = r.spec.scenario or r.spec.workload
            if r.status in ("done", "skipped") and r.doc is not None:
                self.by.setdefault(cfg, []).append(r.doc)
            else:
                self.failed[cfg] = self.failed.get(cfg, 0) + 1

    def value(self, cfg: tuple[str, int], analysis: str, key: str) -> float | None:
        """The median over the configuration's runs of one summary."""
        return median([d["results"].get(analysis, {}).get("summary", {}).get(key)
                       for d in self.by.get(cfg, [])])

    def peak(self, cfg: tuple[str, int], figure: str) -> float | None:
        return self.value(cfg, "sharing", f"peak_{figure}")

    def ksm_memory(self, cfg: tuple[str, int]) -> float | None:
        """Time-weighted mean memory with the KSM model: mmap/fork's mean less its savings."""
        vals = []
        for d in self.by.get(cfg, []):
            mf = d["results"].get("oracle", {}).get("summary", {}).get("mmap_fork_mean")
            saved = d["results"].get("ksm", {}).get("summary", {}).get("saved_pages_mean")
            if mf is not None and saved is not None:
                vals.append(mf - saved)
        return median(vals)

    def shareable(self, cfg: tuple[str, int], kind: str, column: str) -> float | None:
        vals = []
        for d in self.by.get(cfg, []):
            t = d["results"].get("sharing", {}).get("tables", {}).get("shareable_by_type")
            if t:
                i = t["columns"].index(column)
                vals += [row[i] for row in t["rows"] if row[0] == kind]
        return median(vals)

    def count(self, cfg: tuple[str, int]) -> int:
        return len(self.by.get(cfg, []))


def fmt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def rel(v: float | None, base: float | None) -> float | None:
    return None if v is None or not base else v / base


def md_table(head: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def extra_rows(runs: Runs, cols: list[tuple[str, int]], base: float | None) -> list[list[str]]:
    """The columns the thesis could not have, relative to the same base."""
    return [
        ["oracle, time-weighted mean"] + [fmt(rel(runs.value(c, "oracle", "oracle_mean"), base))
                                          for c in cols],
        ["oracle, minimum"] + [fmt(rel(runs.value(c, "oracle", "oracle_min"), base))
                               for c in cols],
        ["mmap/fork, time-weighted mean"] + [
            fmt(rel(runs.value(c, "oracle", "mmap_fork_mean"), base)) for c in cols],
        ["KSM model at defaults, time-weighted mean"] + [fmt(rel(runs.ksm_memory(c), base))
                                                         for c in cols],
        ["KSM model: share of the oracle's savings reached"] + [
            pct(runs.value(c, "ksm", "fraction_of_guest_oracle")) for c in cols],
        ["page-time of sharing snapshots never see"] + [
            pct(runs.value(c, "snapshot_vs_continuous", "page_time_share_never_seen"))
            for c in cols],
        ["opportunities snapshots never see"] + [
            pct(runs.value(c, "snapshot_vs_continuous", "share_never_seen_by_snapshots"))
            for c in cols],
        ["snapshot interval (guest s)"] + [
            fmt(runs.value(c, "snapshot_vs_continuous", "interval")) for c in cols],
    ]


def pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f} %"


def table_5_1(runs: Runs) -> tuple[str, float | None]:
    base = runs.peak(("terminal-server", 1), "mmap_fork")
    rows = []
    for f in FIGURES:
        rows.append([FIGURE_NAMES[f]] + [
            f"{fmt(rel(runs.peak(c, f), base))} ({TABLE_5_1[f][i]:.2f})"
            for i, c in enumerate(COLUMNS_5_1)])
    rows += extra_rows(runs, COLUMNS_5_1, base)
    return md_table([""] + HEAD_5_1, rows), base


def table_5_2(runs: Runs) -> str:
    cols = [("zero-install", n) for n in (1, 2, 3)]
    rows = []
    for kind in ("anonymous", "named", "mixed"):
        rows.append([f"{kind} pages"] + [
            f"{fmt(runs.shareable(c, kind, 'sharings'), 0)} ({TABLE_5_2[kind][i]})"
            for i, c in enumerate(cols)])
    for kind in ("anonymous", "named", "mixed"):
        rows.append([f"{kind}: distinct contents"] + [
            fmt(runs.shareable(c, kind, "contents"), 0) for c in cols])
    return md_table(["", "1 user", "2 users", "3 users"], rows)


def table_5_3(runs: Runs) -> tuple[str, float | None]:
    cols = [("game-server", n) for n in (1, 2, 3)]
    base = runs.peak(cols[0], "mmap_fork")
    rows = [[FIGURE_NAMES[f]] + [f"{fmt(rel(runs.peak(c, f), base))} ({TABLE_5_3[f][i]:.2f})"
                                 for i, c in enumerate(cols)] for f in FIGURES]
    rows += extra_rows(runs, cols, base)
    return md_table(["", "1 server", "2 servers", "3 servers"], rows), base


def bar_figure(runs: Runs, workload: str, path: Path, title: str) -> bool:
    """Figures 5.3-5.5: for 1, 2, 3 instances, the four figures in page frames (median of
    the runs), beside them the oracle's time-weighted mean and minimum."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cfgs = [(workload, n) for n in (1, 2, 3) if runs.count((workload, n))]
    if not cfgs:
        return False
    series = [(FIGURE_NAMES[f], [runs.peak(c, f) for c in cfgs]) for f in FIGURES]
    series += [("oracle mean", [runs.value(c, "oracle", "oracle_mean") for c in cfgs]),
               ("oracle min", [runs.value(c, "oracle", "oracle_min") for c in cfgs])]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    x = np.arange(len(cfgs))
    w = 0.8 / len(series)
    hatches = ["", "", "", "", "//", ".."]
    for i, (label, vals) in enumerate(series):
        ax.bar(x + (i - (len(series) - 1) / 2) * w, [v or 0 for v in vals], w, label=label,
               hatch=hatches[i], edgecolor="black", linewidth=0.5,
               color=f"C{i}" if i < 4 else "white")
    ax.set_xticks(x, [f"{n} {'server' if workload == 'game-server' else 'user'}"
                      f"{'s' if n > 1 else ''}" for _, n in cfgs])
    ax.set_ylabel("memory (page frames)")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def over_time_figure(runs: Runs, path: Path) -> bool:
    """For three instances of each workload (its first run): mmap/fork, the oracle and the
    KSM model's memory over guest time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cfgs = [(w, 3) for w in REAL if runs.count((w, 3))]
    if not cfgs:
        return False
    fig, axes = plt.subplots(len(cfgs), 1, figsize=(9, 3.4 * len(cfgs)), squeeze=False)
    for ax, cfg in zip(axes[:, 0], cfgs, strict=True):
        doc = runs.by[cfg][0]
        o = doc["results"].get("oracle", {}).get("tables", {}).get("series")
        k = doc["results"].get("ksm", {}).get("tables", {}).get("series")
        if not o or not o["rows"]:
            continue
        col = {c: i for i, c in enumerate(o["columns"])}
        xcol = "seconds" if "seconds" in col else "t"
        ot = np.array([r[col["t"]] for r in o["rows"]], dtype=np.float64)
        ox = np.array([r[col[xcol]] for r in o["rows"]], dtype=np.float64)
        mf = np.array([r[col["mmap_fork"]] for r in o["rows"]], dtype=np.float64)
        ax.step(ox, mf, where="post", label="mmap/fork")
        ax.step(ox, [r[col["ksm_hint_all"]] for r in o["rows"]], where="post",
                label="KSM hint all")
        ax.step(ox, [r[col["oracle"]] for r in o["rows"]], where="post", label="oracle")
        if k and k["rows"]:
            kc = {c: i for i, c in enumerate(k["columns"])}
            kt = np.array([r[kc["t"]] for r in k["rows"]], dtype=np.float64)
            saved = np.array([r[kc["saved_pages"]] for r in k["rows"]], dtype=np.float64)
            i = np.clip(np.searchsorted(ot, kt, side="right") - 1, 0, len(ot) - 1)
            kx = np.interp(kt, ot, ox)
            ax.step(kx, mf[i] - saved, where="post", label="KSM model (defaults)")
        ax.set_title(f"{cfg[0]}, 3 instances ({runs.scenario.get(cfg[0], cfg[0])})")
        ax.set_xlabel("guest seconds" if xcol == "seconds" else "trace clock")
        ax.set_ylabel("memory (page frames)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_thesis_report(out: Path, runner: Any) -> Path:
    """``OUT/report/thesis.md`` and its figures; the Markdown's path."""
    runs = Runs(runner.runs)
    rdir = out / "report"
    rdir.mkdir(parents=True, exist_ok=True)
    t51, base51 = table_5_1(runs)
    t53, base53 = table_5_3(runs)
    ks = sorted({runs.count(c) for c in runs.by})
    md = ["# The thesis's evaluation, reproduced", "",
          f"Study `{runner.study.name}` in `{out}`: "
          f"{', '.join(f'{w} ({runs.scenario.get(w, w)})' for w in REAL)}; "
          f"1, 2 and 3 instances each, {'/'.join(map(str, ks)) or 0} run(s) per "
          "configuration, every figure the median over them. Cells read *ours (thesis)*.",
          ""]
    if runs.failed:
        md += ["Runs that did not finish (left out of the medians): " + ", ".join(
            f"{w} n={n}: {k}" for (w, n), k in sorted(runs.failed.items())) + ".", ""]
    if runner.study.notes:
        md += ["## Scenarios", ""] + [f"- {n}." for n in runner.study.notes] + [
            "", "The thesis's numbers come from its workloads (hundreds of MiB per user); "
            "ours from miniatures of tens of MiB, so the shape of each table is what "
            "compares, not its digits.", ""]
    else:
        md += ["## Scenarios", "", "The thesis's workloads on real software from Debian "
               "bookworm: per user Xvfb, an Xfce session, Firefox ESR and LibreOffice Writer "
               "(`desktop`, terminal-server and zero-install layouts); OpenArena dedicated "
               "servers, each from its own copy of the game (`game-server`). The software is "
               "not the thesis's (Xfce 4.8, Firefox and LibreOffice of 2012; CS:GO), so the "
               "digits differ where the programs do.", ""]
    md += ["## Table 5.1: relative memory consumption (terminal server, zero-install)", "",
           f"Relative to the single-user mmap/fork case: ours "
           f"{fmt(base51 and base51 / MIB_PAGES, 1)} MiB ({fmt(base51, 0)} pages), the "
           f"thesis's {TABLE_5_1_BASE_MIB} MiB. The four figures at the sample with the most "
           "frames mapped; below them, from the same traces, what the thesis could not "
           "measure.", "", t51, "",
           "## Table 5.2: shareable pages by type (zero-install)", "",
           "Frames that sharing within each type could free (a content held by k frames "
           "frees k-1), at the peak; *mixed*: contents held by both anonymous and named "
           "frames.", "", table_5_2(runs), "",
           "## Table 5.3: game servers", "",
           f"Relative to one server's mmap/fork: ours {fmt(base53 and base53 / MIB_PAGES, 1)} "
           f"MiB ({fmt(base53, 0)} pages), the thesis's {TABLE_5_3_BASE_MIB} MiB.", "",
           t53, "", "## Figures", ""]
    figs = [("terminal-server", "fig-5.3-terminal-server.png",
             "Memory consumption, terminal server (cf. Figure 5.3)"),
            ("zero-install", "fig-5.4-zero-install.png",
             "Memory consumption, zero-install terminal server (cf. Figure 5.4)"),
            ("game-server", "fig-5.5-game-server.png",
             "Memory consumption, game server (cf. Figure 5.5)")]
    for w, name, title in figs:
        if bar_figure(runs, w, rdir / name, title):
            md += [f"![{title}]({name})", ""]
    if over_time_figure(runs, rdir / "fig-over-time.png"):
        md += ["Over time, three instances of each (first run): what a snapshot table "
               "summarises in one number.", "", "![over time](fig-over-time.png)", ""]
    md += ["## How these numbers were made", "",
           f"`trace-study thesis` recorded every run with `trace-record` and analyzed it with "
           f"`trace-analyze {' '.join(runner.study.analyze_argv)} --format json`; the "
           f"Parquet dataset is in `{out / 'results'}` (`runs.parquet`: a row per run).", ""]
    path = rdir / "thesis.md"
    path.write_text("\n".join(md))
    return path
