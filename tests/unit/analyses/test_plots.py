"""Pictures, checked as pictures: each analysis draws the series it says it draws (matplotlib's
artists before saving), on the report's time axis; the PNG has the panels; an analysis with its
own options and plot needs nothing but the registry."""

from __future__ import annotations

import argparse
import json

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")
import matplotlib.image as mpimg  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

from memtrace.analyses import cli, registry  # noqa: E402
from memtrace.analyses.attribution import AttributionAnalysis  # noqa: E402
from memtrace.analyses.base import Analysis, Interval, Plot, Result, Table  # noqa: E402
from memtrace.analyses.engine import Replay  # noqa: E402
from memtrace.analyses.oracle import OracleAnalysis  # noqa: E402
from memtrace.analyses.plot import draw  # noqa: E402
from memtrace.analyses.sharing import SharingAnalysis  # noqa: E402
from memtrace.analyses.snapshots import SnapshotVsContinuous  # noqa: E402
from memtrace.traces.reader import open_trace  # noqa: E402
from tests.helpers import Builder  # noqa: E402
from tests.paths import SAMPLES  # noqa: E402

SAMPLE = SAMPLES / "default.mtr"


def drawn(plot: Plot) -> tuple[set[str], plt.Axes, plt.Figure]:
    fig, ax = plt.subplots()
    plot.draw(ax)
    labels = {line.get_label() for line in ax.get_lines()}
    labels |= {c.get_label() for c in ax.containers}
    return labels, ax, fig


@pytest.fixture(scope="module")
def sample_results():
    ans = [SharingAnalysis(), OracleAnalysis(), SnapshotVsContinuous(),
           AttributionAnalysis(views=("task", "file", "kind"))]
    rp = Replay(open_trace(SAMPLE), ans, progress=False)
    rp.run()
    return rp, {a.name: (a, a.result()) for a in ans}


def test_memory_panel_draws_the_four_figures_and_the_oracle_in_guest_seconds(sample_results):
    rp, res = sample_results
    plots = [p for name in ("sharing", "oracle") for p in res[name][0].plots(res[name][1])]
    assert {p.panel for p in plots} == {"memory"}
    fig, ax = plt.subplots()
    for p in plots:
        p.draw(ax)
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert {"no sharing", "mmap/fork", "KSM hint all", "full CBPS (samples)",
            "oracle lower bound (every change)"} <= set(lines)
    x = lines["mmap/fork"].get_xdata()
    assert x[0] == 0 and x[-1] == pytest.approx(12.25, abs=0.01)  # guest seconds, not 1e9s
    peak = res["sharing"][1].summary["peak_mmap_fork"] * 4096 / 2**20
    assert max(lines["mmap/fork"].get_ydata()) == pytest.approx(peak)
    plt.close(fig)


def test_snapshot_and_attribution_pictures(sample_results):
    _, res = sample_results
    a, r = res["snapshot_vs_continuous"]
    panels = {p.panel: p for p in a.plots(r)}
    assert set(panels) == {"snapshots-missed", "snapshots-lifetimes"}
    labels, ax, fig = drawn(panels["snapshots-missed"])
    assert {"page-time missed", "opportunities never seen"} <= labels
    assert len(ax.get_lines()[0].get_xdata()) == len(r.tables["missed_by_interval"].rows)
    plt.close(fig)
    a, r = res["attribution"]
    panels = {p.panel: p for p in a.plots(r)}
    assert {"attribution-kind", "attribution-exe", "attribution-file"} <= set(panels)
    labels, ax, fig = drawn(panels["attribution-kind"])
    assert {"saved within one address space", "saved between address spaces"} <= labels
    ticks = dict(zip(ax.get_yticks(), (t.get_text() for t in ax.get_yticklabels()),
                     strict=True))
    assert ticks[max(ticks)] == r.tables["by_kind"].rows[0][0]  # the largest on top
    plt.close(fig)


def test_png_has_a_panel_per_picture_and_phases(sample_results, tmp_path):
    rp, res = sample_results
    png = tmp_path / "all.png"
    offered = [(a, a.plots(r)) for a, r in res.values()]
    n_panels = len({p.panel for _, plots in offered for p in plots})
    draw(str(png), offered, rp.context, "default.mtr: zero-install n=2")
    img = mpimg.imread(png)
    assert img.shape[1] == 1100 and img.shape[0] == pytest.approx(4.8 * 110 * n_panels, rel=0.02)
    assert png.stat().st_size > 50_000


def test_without_guest_clock_the_axis_is_instructions(tmp_path):
    b = Builder(tmp_path / "t.mtr").at(0)
    b.page(1, 1).page(2, 1).map(1, 0, 1).map(2, 0, 2).at(10).page(2, 2).at(20).close()
    sh = SharingAnalysis()
    rp = Replay(open_trace(tmp_path / "t.mtr"), [sh], progress=False)
    rp.run()
    r = sh.result()
    assert "seconds" not in r.tables["series"].columns
    assert rp.context.time.axis == "instructions"
    png = tmp_path / "s.png"
    draw(str(png), [(sh, sh.plots(r))], rp.context, "t")
    fig, ax = plt.subplots()
    sh.plots(r)[0].draw(ax)
    # 1/100 of 20 clock units rounds up to 1: samples every unit, from the start
    assert list(ax.get_lines()[0].get_xdata())[:3] == [0, 1, 2]
    plt.close(fig)


def test_seconds_and_clock_units_give_the_same_instants(tmp_path):
    """With a linear time base (100 clock units per guest second), --interval 0.5s and
    --interval 50 sample the same instants."""
    b = Builder(tmp_path / "t.mtr").at(0)
    b.w.counter("guest.clock_ns", 0)
    b.page(1, 1).map(1, 0, 1)
    for t in range(100, 1001, 100):
        b.at(t).page(1, t)
        b.w.counter("guest.clock_ns", t * 10**7)
    b.close()
    got = {}
    for iv in ("0.5s", "50"):
        sh = SharingAnalysis(Interval.parse(iv))
        Replay(open_trace(tmp_path / "t.mtr"), [sh], progress=False).run()
        got[iv] = sh.result().tables["series"].column("t")
    assert got["0.5s"] == got["50"] and len(got["50"]) == 21


class Toy(Analysis):
    """An analysis from outside: its own option, its own plot."""

    name = "toy"
    flag = "--toy"
    help = "count instants"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--toy-scale", type=int, default=1)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Toy:
        return cls(args.toy_scale)

    def __init__(self, scale: int = 1) -> None:
        self.scale, self.n = scale, 0

    def on_interval(self, state, t0, t1) -> None:
        self.n += 1

    def result(self) -> Result:
        return Result("toy", {"instants": self.n * self.scale},
                      tables={"t": Table(["i"], [[i] for i in range(self.n)])})

    def plots(self, result: Result) -> list[Plot]:
        return [Plot("toy", "toy", lambda ax: ax.plot([0, 1], [0, 1], label="toy line"))]


def test_an_analysis_needs_only_the_registry(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(registry, "ANALYSES", [*registry.ANALYSES, Toy])
    monkeypatch.setattr(cli, "ANALYSES", registry.ANALYSES)
    png = tmp_path / "toy.png"
    assert cli.run(["--toy", "--toy-scale", "3", "--format", "json", "-q", "--plot",
                    str(png)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc["results"]) == {"toy"} and doc["results"]["toy"]["summary"]["instants"] > 0
    assert doc["results"]["toy"]["summary"]["instants"] % 3 == 0
    assert mpimg.imread(png).shape[0] > 100
    assert np.isfinite(doc["results"]["toy"]["summary"]["instants"])
