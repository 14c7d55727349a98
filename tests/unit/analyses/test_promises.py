"""Promises of the README and tracer/README that only a test keeps: lost-event accounting,
reading a cut trace up to its last complete chunk, seeking through checkpoints, Ctrl-C in
trace-analyze, CSV without --table, the README's figures for the shipped sample, --verify."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

from memtrace.analyses.checkpoints import add_checkpoints
from memtrace.analyses.engine import Replay, state_digest
from memtrace.analyses.oracle import OracleAnalysis
from memtrace.analyses.sharing import SharingAnalysis
from memtrace.tracer.verify import verify
from memtrace.traces.format import LostSource, events_lost
from memtrace.traces.reader import open_trace
from memtrace.traces.synthetic import generate
from memtrace.traces.writer import TraceWriter
from tests.helpers import Builder, content
from tests.paths import REPO, SAMPLES

README = (REPO / "README.md").read_text()


def cli(*args, rc=0):
    p = subprocess.run([sys.executable, "-m", "memtrace.analyses.cli", *map(str, args)],
                       capture_output=True, text=True, timeout=600)
    assert "Traceback" not in p.stderr, p.stderr
    assert p.returncode == rc, p.stderr
    return p


def default_sigint() -> None:
    """In the child: SIGINT back to its default action. A shell starts background jobs with
    SIGINT ignored, and a Python started with SIGINT ignored installs no KeyboardInterrupt
    handler: under ``pytest ... &`` the Ctrl-C would be lost and the replay run to its end."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# -- lost events ------------------------------------------------------------------------------
def test_lost_sources_overlap_and_the_warning_says_so(tmp_path):
    """Five ring-full drops are also five sequence gaps: 5 events lost, not 10; the tracer's
    own losses add."""
    b = Builder(tmp_path / "t.mtr").at(1)
    b.page(1, 1).map(1, 0, 1)
    b.w.lost(LostSource.AGENT_RING_FULL, 3)
    b.w.lost(LostSource.AGENT_SEQ_GAP, 3)
    b.at(2)
    b.w.lost(LostSource.AGENT_RING_FULL, 2)
    b.w.lost(LostSource.AGENT_SEQ_GAP, 3)  # one gap of another cause
    b.w.lost(LostSource.TRACER_BUFFER, 4)
    b.at(3).close()
    st = Replay(open_trace(tmp_path / "t.mtr"), progress=False).run()
    assert st.lost == {1: 5, 2: 6, 3: 4}
    assert events_lost(st.lost) == 6 + 4
    err = cli(tmp_path / "t.mtr", "--oracle", "-q").stderr
    assert "10 guest events were lost" in err
    assert "agent_ring_full: 5, agent_seq_gap: 6, tracer_buffer: 4" in err
    assert events_lost({}) == 0 and events_lost({2: 7}) == 7


# -- a cut trace --------------------------------------------------------------------------------
def test_a_trace_cut_at_any_byte_reads_up_to_its_last_complete_chunk(tmp_path):
    p = tmp_path / "t.mtr"
    generate(p, instances=2, epochs=200, chunk_bytes=1024)
    whole = open_trace(p)
    ends = [c.end for c in whole.chunks_all]
    assert len(whole.chunks) >= 8
    data = p.read_bytes()
    digests = {}
    cuts = sorted({e + d for e in ends[:-1] for d in (-1, 0, 1)} |
                  {whole.chunks[3].offset + 20, len(data) - 1})
    for cut in cuts:
        q = tmp_path / "cut.mtr"
        q.write_bytes(data[:cut])
        tr = open_trace(q)
        # a chunk is complete when its payload is (its zero padding may be cut off)
        complete = [c for c in whole.chunks if c.offset + 48 + c.payload_len <= cut]
        assert [c.offset for c in tr.chunks] == [c.offset for c in complete], cut
        n = len(complete)
        if n not in digests:
            ref = Replay(open_trace(p), progress=False)
            for c in complete:
                ref.apply_chunk(ref.trace.read_chunk(c))
            digests[n] = state_digest(ref.finish())
        got = state_digest(Replay(tr, progress=False).run())
        assert got == digests[n], cut


def test_cli_on_a_cut_trace_reports_what_precedes_the_cut(tmp_path):
    p = tmp_path / "t.mtr"
    generate(p, instances=2, epochs=80, chunk_bytes=8192)
    full = open_trace(p)
    cut_at = full.chunks[len(full.chunks) // 2].end + 100
    q = tmp_path / "cut.mtr"
    q.write_bytes(p.read_bytes()[:cut_at])
    r = cli(q, "--oracle", "--format", "json", "-q")
    m = re.search(r"reading the (\d+) complete chunks", r.stderr)
    assert m and int(m.group(1)) == len(full.chunks) // 2 + 1
    doc = json.loads(r.stdout)
    assert doc["results"]["oracle"]["summary"]["change_points"] > 0
    assert doc["results"]["oracle"]["summary"]["duration"] < \
        json.loads(cli(p, "--oracle", "--format", "json", "-q").stdout)[
            "results"]["oracle"]["summary"]["duration"]


# -- seeking ------------------------------------------------------------------------------------
def eventful_trace(path, epochs=300):
    """Spaces with VMAs, a counter and a loss every few epochs, pages and mappings changing:
    small chunks, so checkpoints fall between many of them."""
    b = Builder(path, chunk_bytes=1024).at(0)
    for mm in (1, 2, 3):
        b.w.task(1, 10 + mm, 10 + mm, 1, mm=mm, name=f"p{mm}")
        b.w.vma(1, 10 + mm, mm, 0x1000, 0x9000, 3, 0, 0, 0, None)
    for e in range(1, epochs + 1):
        b.at(e * 100)
        mm = e % 3 + 1
        b.page(e % 40, e % 7 + 1).map(mm, e % 8 + 1, e % 40)
        if e % 5 == 0:
            b.w.counter(f"c{e % 2}", e)
            b.w.vma(3, 10 + mm, mm, 0x1000 + (e % 4) * 0x1000, 0x2000 + (e % 4) * 0x1000,
                    1 + e % 2, 0, 0, 0, None)
        if e % 50 == 0:
            b.w.lost(3, 1)
    b.close()


def test_seek_uses_checkpoints_and_restores_vmas_and_counters(tmp_path):
    p = tmp_path / "t.mtr"
    eventful_trace(p)
    add_checkpoints(p, 4, progress=False)
    tr = open_trace(p)
    assert len(tr.checkpoints) >= 3
    t = tr.chunks[-3].t_last
    full = Replay(open_trace(p), progress=False)
    full._replay(full.trace.chunks, t)
    full.state.end_instant()
    want = state_digest(full.state)
    assert want["vmas"] and want["counters"], "the comparison must include VMAs and counters"

    class Counting:
        def __init__(self, tr):
            self.tr, self.read = tr, []

        def __getattr__(self, name):
            return getattr(self.tr, name)

        def read_chunk(self, info):
            self.read.append(info)
            return self.tr.read_chunk(info)

    counting = Counting(open_trace(p))
    rp = Replay(counting, progress=False)  # type: ignore[arg-type]
    got = state_digest(rp.seek(t))
    assert got == want
    decoded = [c for c in counting.read if not c.checkpoint]
    assert len(decoded) < len(tr.chunks) // 2, "seek decoded the chunks before the checkpoint"
    assert any(c.checkpoint for c in counting.read)


# -- Ctrl-C ---------------------------------------------------------------------------------------
def busy_trace(path, epochs=300, per_epoch=20_000, frames=1 << 16):
    """Many page updates over few frames (a replay of a few seconds), one address space."""
    rng = np.random.default_rng(7)
    with TraceWriter(str(path), {"ram_size": frames * 4096, "source": "synthetic",
                                 "clock_unit": "instructions"}) as w:
        w.time(0)
        w.task(1, 10, 10, 1, mm=7, name="p")
        vpn = np.arange(frames, dtype=np.uint64)
        w.map(np.full(frames, 7, np.uint64), vpn, vpn, np.ones(frames, np.uint64))
        for e in range(1, epochs + 1):
            w.time(e * 1000)
            fr = rng.integers(0, frames, per_epoch, dtype=np.uint64)
            lo = rng.integers(1, 1 << 62, per_epoch, dtype=np.uint64)
            w.page(fr, lo, lo)


def test_ctrl_c_gives_partial_results_and_status_130(tmp_path):
    p = tmp_path / "busy.mtr"
    busy_trace(p)
    proc = subprocess.Popen([sys.executable, "-m", "memtrace.analyses.cli", str(p),
                             "--progress", "--format", "json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=default_sigint)
    assert proc.stderr is not None
    seen = b""
    while not re.search(rb"t=[1-9][\d,]{4}", seen):  # the replay is beyond its first instants
        byte = proc.stderr.read(1)
        assert byte, "trace-analyze ended before its replay was under way"
        seen += byte
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=600)
    err = seen + err
    assert proc.returncode == 130, err.decode()[-2000:]
    assert b"Traceback" not in err
    assert b"interrupted at time" in err
    doc = json.loads(out)
    summary = doc["results"]["oracle"]["summary"]
    assert 0 < summary["duration"] < 300_000 - 1000, "results cover the trace up to the signal"


# -- outputs -------------------------------------------------------------------------------------
def test_csv_without_table_prints_every_table_in_blocks():
    out = cli("--format", "csv", "-q").stdout
    assert out.startswith("analysis,key,value,unit\n")
    blocks = re.findall(r"^# (\S+)$", out, re.M)
    assert {"sharing.series", "oracle.series", "snapshot_vs_continuous.snapshots"} <= set(blocks)
    assert "oracle,oracle_mean," in out


def test_readme_figures_of_the_shipped_sample():
    """The figures the README gives for the sample are the ones trace-analyze prints."""
    tr = open_trace(SAMPLES / "default.mtr")
    sh, o = SharingAnalysis(), OracleAnalysis()
    Replay(tr, [sh, o], progress=False).run()
    s, os_ = sh.result().summary, o.result().summary
    mf = s["peak_mmap_fork"]
    said = re.search(r"at the peak, mmap/fork\s+([\d.]+) MiB, KSM hint all ([\d.]+)x of it, "
                     r"full CBPS ([\d.]+)x; ([\d,]+) pages saved at the peak", README)
    assert said, "the README's sentence on the sample's peak"
    assert float(said.group(1)) == round(mf * 4096 / 2**20, 1)
    assert float(said.group(2)) == round(s["peak_ksm_hint_all"] / mf, 2)
    assert float(said.group(3)) == round(s["peak_full_cbps"] / mf, 2)
    assert int(said.group(4).replace(",", "")) == mf - s["peak_full_cbps"]
    oracle = re.search(r"oracle\s+minimum\s+([\d,]+),\s+maximum\s+([\d,]+)\s+and\s+mean\s+"
                       r"([\d,]+)\s+pages", README)
    assert oracle, "the README's oracle figures of the sample"
    assert [int(x.replace(",", "")) for x in oracle.groups()] == [
        os_["oracle_min"], os_["oracle_max"], round(os_["oracle_mean"])]


def test_means_and_savings_by_hand(tmp_path):
    """[10, 20): frames 1,2 anonymous with A, frame 3 named with A (mapped by two spaces);
    [20, 40): frame 2 rewritten to B. Worked out: no sharing 4 (frame 3 counted twice), mmap/fork
    3; KSM hint all = 1 named + distinct anonymous (1, then 2); full CBPS 1, then 2."""
    b = Builder(tmp_path / "t.mtr").at(10)
    b.page(1, 0xA).page(2, 0xA).page(3, 0xA)
    b.w.pagecache(1, 8, 5, 0, 3)
    b.map(1, 0, 1).map(2, 0, 2).map(1, 1, 3).map(2, 1, 3)
    b.at(20).page(2, 0xB).at(40).close()
    o = OracleAnalysis()
    Replay(open_trace(tmp_path / "t.mtr"), [o], progress=False).run()
    s = o.result().summary
    assert s["no_sharing_mean"] == 4 and s["mmap_fork_mean"] == 3
    assert s["ksm_hint_all_mean"] == round((10 * 2 + 20 * 3) / 30, 2)
    assert s["oracle_mean"] == round((10 * 1 + 20 * 2) / 30, 2)
    # page*units: against mmap/fork (3-1)*10 + (3-2)*20; against KSM hint all (2-1)*10 +
    # (3-2)*20
    assert s["savings_vs_mmap_fork"] == 40 and s["savings_vs_ksm_hint_all"] == 30
    assert content(0xA) != content(0xB)


# -- --verify --------------------------------------------------------------------------------
def test_verify_finds_a_differing_frame(tmp_path):
    """tracer/verify.py against a memory image: equal frames match, a changed byte differs,
    a frame no PAGE record described is counted apart."""
    ps = 4096
    image = np.zeros(8 * ps, dtype=np.uint8)
    for f in range(6):
        image[f * ps:(f + 1) * ps] = np.frombuffer(int(100 + f).to_bytes(8, "little") * 512,
                                                   np.uint8)
    b = Builder(tmp_path / "t.mtr", nframes=8).at(1)
    for f in range(6):
        b.page(f, 100 + f)
    b.page(6, 0)
    b.at(2).close()
    ram = tmp_path / "ram"
    ram.write_bytes(image.tobytes())
    res = verify(tmp_path / "t.mtr", ram)
    assert res.ok is False  # frame 7 was never described
    assert (res.frames, res.matched, res.unknown, res.mismatched) == (8, 7, 1, [])
    image[3 * ps + 17] ^= 1
    ram.write_bytes(image.tobytes())
    res = verify(tmp_path / "t.mtr", ram, exclude=(7 * ps, ps))
    assert not res.ok and res.mismatched == [3] and res.unknown == 0
    assert "1 differ" in res.summary() and "0x3" in res.summary()


@pytest.mark.parametrize("frames", [[], [2]])
def test_record_verification_status(tmp_path, frames):
    """trace-record's --verify turns a difference into exit status 3."""
    from memtrace.tracer.record import verification_status

    b = Builder(tmp_path / "t.mtr", nframes=4).at(1)
    for f in range(4):
        b.page(f, 0)
    b.at(2).close()
    image = np.zeros(4 * 4096, dtype=np.uint8)
    for f in frames:
        image[f * 4096] = 1
    (tmp_path / "ram").write_bytes(image.tobytes())
    assert verification_status(tmp_path / "t.mtr", tmp_path / "ram", "pages", None,
                               quiet=True) == (3 if frames else 0)
