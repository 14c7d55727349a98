"""Attribution (analyses/attribution/): known answers on hand-built traces, a real ELF file,
the shipped sample, and the command line (--by, --top, --show-page)."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from memtrace.analyses.attribution.analysis import AttributionAnalysis
from memtrace.analyses.attribution.guestfiles import GuestFiles, resolve_in_root
from memtrace.analyses.attribution.showpage import hexdump
from memtrace.analyses.engine import Replay
from memtrace.analyses.sharing import SharingAnalysis
from memtrace.traces.format import PageCacheOp, TaskOp, VmaOp
from memtrace.traces.pagehash import ZERO_HASH, page_hash
from memtrace.traces.reader import open_trace
from memtrace.traces.synthetic import generate
from tests.helpers import Builder
from tests.paths import REPO

ROOT = REPO
SAMPLE = ROOT / "traces" / "samples" / "default.mtr"
GUEST_ROOT = ROOT / "build" / "guest" / "rootfs"
PS = 4096
DEV = 8


# -- helpers ----------------------------------------------------------------------------------
def analyze(path: Path, **kw: Any) -> dict[str, Any]:
    """Replay ``path`` with the attribution (and the sharing analysis, to cross-check)."""
    kw.setdefault("views", ("task", "file", "section", "kind"))
    an = AttributionAnalysis(**kw)
    sh = SharingAnalysis(kw.get("interval"))
    rp = Replay(open_trace(path), [sh, an], progress=False)
    st = rp.run()
    return {"r": an.result(), "an": an, "sharing": sh.result(), "state": st}


def table(res: dict[str, Any], name: str, key: int | tuple[int, ...] = 0) -> dict[Any, dict]:
    """Rows of a result table as {key column(s): {column: value}}."""
    t = res["r"].tables[name]
    out = {}
    for row in t.rows:
        k = row[key] if isinstance(key, int) else tuple(row[i] for i in key)
        out[k] = dict(zip(t.columns, row, strict=True))
    return out


def check_sums(res: dict[str, Any]) -> None:
    """Every table adds up to the summary, and the summary to the figures."""
    s = res["r"].summary
    for name in ("by_task", "by_exe", "by_kind", "by_file", "by_section", "by_file_section"):
        if name not in res["r"].tables:
            continue
        rows = list(table(res, name, tuple(range(3))).values())
        for col, key in (("saved", "saved"), ("saved_self", "saved_self"),
                         ("saved_cross", "saved_cross"), ("linux_shared", "linux_shared")):
            assert sum(r[col] for r in rows) == pytest.approx(s[key], abs=0.02 * len(rows) + .01)
        assert sum(r["frames"] for r in rows) == pytest.approx(s["mapped_frames"],
                                                               abs=0.02 * len(rows) + .01)
    assert s["saved"] == pytest.approx(s["saved_self"] + s["saved_cross"], abs=0.02)


def task(b: Builder, pid: int, mm: int, comm: str, ppid: int = 1) -> None:
    b.w.task(TaskOp.EXISTING, pid, pid, ppid, mm=mm, name=comm)


# -- known answers ----------------------------------------------------------------------------
def test_heap_pages_shared_between_two_tasks(tmp_path):
    # a and b each hold one copy of content 7 in their heaps, and one private page:
    # 2 copies in 2 address spaces -> saved 1, all cross sharing, all heap.
    p = tmp_path / "t.mtr"
    b = Builder(p).at(1)
    task(b, 10, 0xA, "a")
    task(b, 20, 0xB, "b")
    for pid, mm in ((10, 0xA), (20, 0xB)):
        b.w.vma(VmaOp.BRK, pid, mm, 0x1000000, 0x1004000)
    b.page(1, 7).page(2, 7).page(3, 8).page(4, 9)
    b.map(0xA, 0x1000, 1).map(0xB, 0x1000, 2).map(0xA, 0x1001, 3).map(0xB, 0x1001, 4)
    b.at(10).close()
    res = analyze(p)
    s = res["r"].summary
    assert (s["mapped_frames"], s["saved"], s["saved_self"], s["saved_cross"]) == (4, 1, 0, 1)
    kinds = table(res, "by_kind")
    assert set(kinds) == {"heap"}
    assert kinds["heap"]["saved"] == 1 and kinds["heap"]["frames"] == 4
    tasks = table(res, "by_task", 1)
    assert tasks["a[10]"]["saved_cross"] == 0.5 and tasks["b[20]"]["saved_cross"] == 0.5
    assert tasks["a[10]"]["shareable"] == 1
    check_sums(res)


@pytest.mark.parametrize("path,flags", [("[stack]", 0x3), (None, 0x103)])
def test_identical_stack_pages_in_one_task(tmp_path, path, flags):
    # two copies of one content in one address space's stack (named [stack], or only
    # VM_GROWSDOWN as the agent reports it): saved 1, self sharing.
    p = tmp_path / "t.mtr"
    b = Builder(p).at(1)
    task(b, 30, 0xC, "c")
    b.w.vma(VmaOp.MAP, 30, 0xC, 0x7FF000000, 0x7FF010000, flags, 0, 0, 0, path)
    b.page(5, 4).page(6, 4)
    b.map(0xC, 0x7FF000, 5).map(0xC, 0x7FF001, 6)
    b.at(10).close()
    res = analyze(p)
    s = res["r"].summary
    assert (s["saved"], s["saved_self"], s["saved_cross"], s["self_pct"]) == (1, 1, 0, 100)
    assert table(res, "by_kind")["stack"]["saved_self"] == 1
    check_sums(res)


def test_cow_copy_of_a_file_page(tmp_path):
    # /usr/lib/libx.so page 3 is in the page cache (frame 10) and mapped by e; d has written
    # to its private mapping of the same page: an anonymous copy (frame 11) with the same bytes.
    p = tmp_path / "t.mtr"
    base = 0x7F0000000000
    b = Builder(p).at(1)
    task(b, 40, 0xE, "e")
    task(b, 50, 0xD, "d")
    b.w.vma(VmaOp.MAP, 40, 0xE, base, base + 0x10000, 0x5, 0, 50, DEV, "/usr/lib/libx.so")
    b.w.vma(VmaOp.MAP, 50, 0xD, base, base + 0x10000, 0x3, 0, 50, DEV, "/usr/lib/libx.so")
    b.page(10, 9).page(11, 9)
    b.w.pagecache(PageCacheOp.ADD, DEV, 50, 3, 10)
    b.map(0xE, base // PS + 3, 10).map(0xD, base // PS + 3, 11)
    b.at(10).close()
    res = analyze(p)
    kinds = table(res, "by_kind")
    assert kinds["file"]["frames"] == 1 and kinds["cow"]["frames"] == 1
    assert kinds["file"]["saved"] == 0.5 and kinds["cow"]["saved"] == 0.5
    f = table(res, "by_file")["/usr/lib/libx.so"]
    assert (f["saved"], f["saved_mapped"], f["saved_private"], f["saved_copied"]) == \
        (1, 0.5, 0.5, 0)
    pages = table(res, "file_pages", (0, 1, 4))
    assert set(pages) == {("/usr/lib/libx.so", "0x3000", "mapped"),
                          ("/usr/lib/libx.so", "0x3000", "cow")}
    check_sums(res)


def test_named_duplicates_from_two_files(tmp_path):
    # the same bytes at page 2 of two files (zero-install): one task maps both -> self sharing,
    # each file gets half of the saved page, at offset 0x2000.
    p = tmp_path / "t.mtr"
    b = Builder(p).at(1)
    task(b, 60, 0xF, "f")
    b.w.vma(VmaOp.MAP, 60, 0xF, 0x10000000, 0x10010000, 0x5, 0, 60, DEV, "/a/lib.so")
    b.w.vma(VmaOp.MAP, 60, 0xF, 0x20000000, 0x20010000, 0x5, 0, 61, DEV, "/b/lib.so")
    b.page(20, 11).page(21, 11).page(22, 12)
    b.w.pagecache(PageCacheOp.ADD, DEV, [60, 61, 60], [2, 2, 3], [20, 21, 22])
    b.map(0xF, 0x10002, 20).map(0xF, 0x20002, 21).map(0xF, 0x10003, 22)
    b.at(10).close()
    res = analyze(p)
    files = table(res, "by_file")
    assert files["/a/lib.so"]["saved"] == 0.5 and files["/b/lib.so"]["saved"] == 0.5
    assert files["/a/lib.so"]["frames"] == 2 and files["/b/lib.so"]["frames"] == 1
    assert res["r"].summary["saved_self"] == 1
    pages = table(res, "file_pages", (0, 1))
    assert set(pages) == {("/a/lib.so", "0x2000"), ("/b/lib.so", "0x2000")}
    assert all(r["copies"] == 2 and r["how"] == "mapped" for r in pages.values())
    assert table(res, "by_kind")["file"]["saved"] == 1
    check_sums(res)


def test_zero_pages_are_a_kind_of_their_own(tmp_path):
    # g maps two frames of zeros, h one: saved 2, all zero; g's pair merges inside g (self 1),
    # the remaining two groups across spaces (cross 1).
    p = tmp_path / "t.mtr"
    b = Builder(p).at(1)
    task(b, 70, 0x6, "g")
    task(b, 80, 0x8, "h")
    for pid, mm in ((70, 0x6), (80, 0x8)):
        b.w.vma(VmaOp.MAP, pid, mm, 0x40000000, 0x40010000, 0x3)
    b.page(30, 0).page(31, 0).page(32, 0).page(33, 5)
    b.map(0x6, 0x40000, 30).map(0x6, 0x40001, 31).map(0x8, 0x40000, 32).map(0x8, 0x40001, 33)
    b.at(10).close()
    res = analyze(p, top=2)
    s = res["r"].summary
    assert (s["saved"], s["saved_zero"], s["saved_self"], s["saved_cross"]) == (2, 2, 1, 1)
    assert s["self_pct_without_zero"] == 0
    kinds = table(res, "by_kind")
    assert kinds["zero"]["saved"] == 2 and kinds["anon"]["saved"] == 0
    top = res["r"].tables["top"].rows
    assert len(top) == 1 and top[0][1] == f"{ZERO_HASH[1]:016x}{ZERO_HASH[0]:016x}"
    assert top[0][2:4] == [3, 2] and "g[70] zero x2" in top[0][5]
    check_sums(res)


def test_self_and_cross_split_with_unequal_groups(tmp_path):
    # content 3: a holds 3 copies, b 1 -> saved 3 = self 2 (a's three become one) + cross 1.
    # a's copies get (3-1)/3 self and (2-1)/(2*3) cross each; b's copy gets 1/2 cross.
    # content 4: frame 40 mapped by a and b (fork, k=2), a copy in c: saved 1, cross; frame 40's
    # half goes 1/4 to a and 1/4 to b; Linux already saves 1 page on frame 40.
    p = tmp_path / "t.mtr"
    b = Builder(p).at(1)
    for pid, mm, comm in ((1, 0xA, "a"), (2, 0xB, "b"), (3, 0xC, "c")):
        task(b, pid, mm, comm, ppid=0)
        b.w.vma(VmaOp.MAP, pid, mm, 0x1000000, 0x1100000, 0x3)
    for f in (1, 2, 3, 4):
        b.page(f, 3)
    b.page(40, 4).page(41, 4)
    b.map(0xA, 0x1000, 1).map(0xA, 0x1001, 2).map(0xA, 0x1002, 3).map(0xB, 0x1000, 4)
    b.map(0xA, 0x1010, 40).map(0xB, 0x1010, 40).map(0xC, 0x1010, 41)
    b.at(10).close()
    res = analyze(p)
    s = res["r"].summary
    assert (s["saved"], s["saved_self"], s["saved_cross"], s["linux_shared"]) == (4, 2, 2, 1)
    t = table(res, "by_task", 1)
    assert t["a[1]"]["saved_self"] == 2
    assert t["a[1]"]["saved_cross"] == pytest.approx(0.5 + 0.25, abs=0.01)
    assert t["b[2]"]["saved_cross"] == pytest.approx(0.5 + 0.25, abs=0.01)
    assert t["c[3]"]["saved_cross"] == 0.5
    assert t["a[1]"]["linux_shared"] == 0.5 and t["b[2]"]["frames"] == 1.5
    check_sums(res)


def _find(parent: dict[int, int], x: int) -> int:
    while parent[x] != x:
        x = parent[x]
    return x


def _naive(spaces: dict[int, dict[int, int]], content_of: dict[int, int]
           ) -> tuple[int, int, int]:
    """(saved, self, cross) by definition: per content, n frames in K groups of frames joined
    by common address spaces (union-find) -> saved n-1, self n-K, cross K-1."""
    owners: dict[int, set[int]] = {}
    for mm, pages in spaces.items():
        for f in pages.values():
            owners.setdefault(f, set()).add(mm)
    by_content: dict[int, list[int]] = {}
    for f in owners:
        by_content.setdefault(content_of[f], []).append(f)
    saved = self_ = cross = 0
    for frames in by_content.values():
        parent = {f: f for f in frames}
        for f in frames:
            for g in frames:
                if owners[f] & owners[g]:
                    parent[_find(parent, f)] = _find(parent, g)
        k = len({_find(parent, f) for f in frames})
        saved += len(frames) - 1
        self_ += len(frames) - k
        cross += k - 1
    return saved, self_, cross


@pytest.mark.parametrize("seed", range(12))
def test_random_states_match_the_definition(tmp_path, seed):
    rng = random.Random(seed)
    p = tmp_path / "t.mtr"
    b = Builder(p).at(1)
    nspaces = rng.randint(1, 5)
    content_of = {f: rng.choice([0, 1, 2, 3, 4, 5]) for f in range(1, 25)}
    for f, tok in content_of.items():
        b.page(f, tok)
    spaces: dict[int, dict[int, int]] = {}
    for i in range(nspaces):
        mm = 0x100 + i
        task(b, 100 + i, mm, f"t{i}")
        b.w.vma(VmaOp.MAP, 100 + i, mm, 0x10000000, 0x10100000, 0x3)
        pages = {0x10000 + v: rng.randint(1, 24) for v in rng.sample(range(40), rng.randint(1, 12))}
        for v, f in pages.items():
            b.map(mm, v, f)
        spaces[mm] = pages
    b.at(10).close()
    res = analyze(p)
    s = res["r"].summary
    saved, self_, cross = _naive(spaces, content_of)
    assert (s["saved"], s["saved_self"], s["saved_cross"]) == \
        (pytest.approx(saved, abs=0.01), pytest.approx(self_, abs=0.01),
         pytest.approx(cross, abs=0.01))
    fig = res["state"].figures()
    assert s["mapped_frames"] == fig["mmap_fork"]
    assert s["saved"] == pytest.approx(fig["mmap_fork"] - fig["full_cbps"], abs=0.01)
    assert s["linux_shared"] == pytest.approx(fig["no_sharing"] - fig["mmap_fork"], abs=0.01)
    check_sums(res)


# -- ELF sections -----------------------------------------------------------------------------
ELF_SOURCE = r"""
const unsigned char ro[3 * 4096] = {1, 2, 3};
unsigned char da[3 * 4096] = {4, 5, 6};
unsigned char bs[3 * 4096];
void big(void) { __asm__(".fill 12288, 1, 0x90"); }
int f(void) { return ro[5] + da[7] + bs[9]; }
"""


def _up(x: int) -> int:
    return -(-x // PS) * PS


@pytest.fixture(scope="module")
def elf_root(tmp_path_factory) -> tuple[Path, dict[str, Any]]:
    """A guest root holding a tiny ELF library built with gcc, and its layout."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    from elftools.elf.elffile import ELFFile

    d = tmp_path_factory.mktemp("elf")
    (d / "t.c").write_text(ELF_SOURCE)
    subprocess.run(["gcc", "-shared", "-fPIC", "-O0", "-o", str(d / "libt.so"), str(d / "t.c")],
                   check=True, capture_output=True)
    root = d / "root"
    (root / "usr" / "lib").mkdir(parents=True)
    shutil.copy(d / "libt.so", root / "usr" / "lib" / "libt.so")
    (root / "lib64").symlink_to("/usr/lib")  # absolute: must resolve inside the root
    (root / "data").mkdir()
    blob = random.Random(5).randbytes(3 * PS)
    (root / "data" / "blob").write_bytes(blob)
    with open(d / "libt.so", "rb") as f:
        elf = ELFFile(f)
        secs = {s.name: (s["sh_offset"], s["sh_addr"], s["sh_size"]) for s in elf.iter_sections()}
        segs = [(s["p_offset"], s["p_vaddr"], s["p_filesz"], s["p_memsz"], s["p_flags"])
                for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
    return root, {"secs": secs, "segs": segs, "bytes": (d / "libt.so").read_bytes(),
                  "blob": blob}


def _elf_trace(p: Path, lay: dict[str, Any]) -> None:
    """Two tasks map libt.so (a through /lib64, b through a run-time copy under /opt/zi), with
    its .text and .rodata pages in the page cache of both files, copies of a .data page and of
    a .bss page in both, and a data file (never mapped) read into both heaps."""
    base = 0x7F0000000000
    data = lay["bytes"]
    secs, segs = lay["secs"], lay["segs"]
    b = Builder(p, nframes=512).at(1)
    frame = iter(range(1, 500))
    for pid, mm, ino, path in ((1, 0xA, 70, "/lib64/libt.so"), (2, 0xB, 71, "/opt/zi/libt.so")):
        task(b, pid, mm, f"p{pid}", ppid=0)
        for off, vaddr, filesz, memsz, pflags in segs:
            vm = (1 if pflags & 4 else 0) | (2 if pflags & 2 else 0) | (4 if pflags & 1 else 0)
            start = base + vaddr - vaddr % PS
            b.w.vma(VmaOp.MAP, pid, mm, start, base + _up(vaddr + filesz), vm, off // PS, ino,
                    DEV, path)
            if memsz > filesz:  # the loader's anonymous .bss continuation
                b.w.vma(VmaOp.MAP, pid, mm, base + _up(vaddr + filesz),
                        base + _up(vaddr + memsz), 0x3)
        for name in (".text", ".rodata"):  # page-cache pages, mapped
            off = _up(secs[name][0])
            seg = next(s for s in segs if s[0] <= off < s[0] + s[2])
            f = next(frame)
            b.w.page(f, *page_hash(data[off:off + PS].ljust(PS, b"\0")))
            b.w.pagecache(PageCacheOp.ADD, DEV, ino, off // PS, f)
            b.map(mm, (base + seg[1] + off - seg[0]) // PS, f)
        for name, tok in ((".data", 0xDA), (".bss", 0xB5)):  # anonymous private copies
            f = next(frame)
            b.page(f, tok)
            b.map(mm, (base + _up(secs[name][1])) // PS, f)
        b.w.vma(VmaOp.BRK, pid, mm, 0x1000000, 0x1010000)
        for i in range(3):  # the data file read into the heap
            f = next(frame)
            b.w.page(f, *page_hash(lay["blob"][i * PS:(i + 1) * PS]))
            b.map(mm, 0x1000 + i, f)
    for i in range(3):  # the data file's page cache (never mapped, so no path in the trace)
        f = next(frame)
        b.w.page(f, *page_hash(lay["blob"][i * PS:(i + 1) * PS]))
        b.w.pagecache(PageCacheOp.ADD, DEV, 90, i, f)
    b.at(10).close()


def test_elf_sections_of_file_pages_and_private_copies(tmp_path, elf_root):
    root, lay = elf_root
    p = tmp_path / "t.mtr"
    _elf_trace(p, lay)
    res = analyze(p, top=3, guest=GuestFiles(root, ["/opt/zi=/usr/lib"]))
    s = res["r"].summary
    assert s["elf_files"] == 1
    assert (s["host_pages_checked"], s["host_pages_differ"]) == (4, 0)
    fs = table(res, "by_file_section", (0, 2))
    for path in ("/lib64/libt.so", "/opt/zi/libt.so"):
        assert fs[(path, ".text")]["saved"] == 0.5 and fs[(path, ".text")]["segment"] \
            .endswith("r-x")
        assert fs[(path, ".rodata")]["saved"] == 0.5
        assert fs[(path, ".data")]["saved"] == 0.5 and fs[(path, ".data")]["segment"] \
            .endswith("rw-")
        assert fs[(path, ".bss")]["saved"] == 0.5
    sec = table(res, "by_section")
    assert {k: sec[k]["saved"] for k in (".text", ".rodata", ".data", ".bss")} == \
        {".text": 1, ".rodata": 1, ".data": 1, ".bss": 1}
    kinds = table(res, "by_kind")
    assert (kinds["file"]["frames"], kinds["cow"]["frames"], kinds["bss"]["frames"]) == (4, 2, 2)
    assert kinds["heap"]["saved"] == 3
    # the data file has no path in the trace: named by the host file with the same pages
    files = table(res, "by_file")
    blob = files["/data/blob (by content)"]
    assert blob["saved"] == 3 and blob["saved_copied"] == 3
    assert next(iter(files)) == "/data/blob (by content)"  # on top: the largest saving
    check_sums(res)


def test_elf_without_guest_root(tmp_path, elf_root):
    _, lay = elf_root
    p = tmp_path / "t.mtr"
    _elf_trace(p, lay)
    res = analyze(p)
    kinds = table(res, "by_kind")
    assert "bss" not in kinds and kinds["anon"]["frames"] == 2  # unconfirmed .bss: plain anon
    assert set(table(res, "by_section")) == {"(no --guest-root)", "(no file)"}
    assert "(dev 0x8 ino 90)" in table(res, "by_file")
    check_sums(res)


def test_resolve_in_root_and_path_maps(tmp_path):
    root = tmp_path / "r"
    (root / "usr" / "lib").mkdir(parents=True)
    (root / "usr" / "lib" / "x.so").write_bytes(b"x")
    (root / "lib").symlink_to("/usr/lib")
    (root / "usr" / "lib" / "y.so").symlink_to("../lib/x.so")
    (root / "loop").symlink_to("loop")
    (tmp_path / "outside").write_bytes(b"o")
    (root / "escape").symlink_to("../../outside")
    r = root.resolve()
    assert resolve_in_root(r, "/lib/x.so") == r / "usr/lib/x.so"
    assert resolve_in_root(r, "/lib/y.so") == r / "usr/lib/x.so"
    assert resolve_in_root(r, "/loop") is None
    assert resolve_in_root(r, "/escape") is None  # .. stops at the root
    g = GuestFiles(root, ["/zi/*/lib=/usr/lib"])
    assert g.map_path("/zi/2/lib/x.so") == "/usr/lib/x.so"
    assert g.map_path("/zi/2/bin/x") == "/zi/2/bin/x"
    assert g.host_path("/zi/1/lib/x.so") == r / "usr/lib/x.so"
    with pytest.raises(ValueError):
        GuestFiles(root, ["nonsense"])


# -- the shipped sample and the synthetic scenario --------------------------------------------
def test_sample_trace_attribution():
    """default.mtr (recorded, zero-install n=2): each instance runs its own copy of python and
    its libraries, so named duplicates between the two copies of each file are the largest
    source, all cross sharing; the totals agree with the sharing analysis's peak."""
    res = analyze(SAMPLE, top=5)
    s = res["r"].summary
    peak = res["sharing"].summary
    assert s["t"] == peak["peak_t"]
    assert s["mapped_frames"] == peak["peak_mmap_fork"]
    assert s["saved"] == pytest.approx(peak["peak_mmap_fork"] - peak["peak_full_cbps"], abs=0.01)
    assert s["linux_shared"] == pytest.approx(peak["peak_no_sharing"] - peak["peak_mmap_fork"],
                                              abs=0.01)
    check_sums(res)
    kinds = table(res, "by_kind")
    # named duplicates between the two copies of each file are one of the two largest sources
    # (anonymous duplicates between the instances the other; which leads depends on the instant)
    assert "file" in list(kinds)[:2] and kinds["file"]["saved"] > 0.3 * s["saved"]
    assert kinds["file"]["saved_cross"] > 0.99 * kinds["file"]["saved"]
    assert "unknown" not in kinds            # forked children: VMAs from the parent
    assert kinds["zero"]["saved"] == s["saved_zero"] > 0
    files = table(res, "by_file")
    top = [f for f in list(files)[:8] if f.startswith("/zi/")]
    assert {"/zi/1/bin/python3.11", "/zi/2/bin/python3.11"} <= set(top)
    for f in top:
        twin = f.replace("/zi/1/", "/zi/2/") if "/zi/1/" in f else f.replace("/zi/2/", "/zi/1/")
        assert files[twin]["saved_mapped"] == files[f]["saved_mapped"]
        assert files[f]["saved_cross"] >= 0.99 * files[f]["saved"]
    assert s["saved_cross"] > 0.8 * s["saved"]
    exes = table(res, "by_exe")
    assert any("/zi/1/" in e for e in exes) and any("/zi/2/" in e for e in exes)
    assert res["r"].tables["top"].rows[0][4].startswith("zero")


def sample_guest_root() -> tuple[GuestFiles, dict[str, Any], dict[str, Any]]:
    """The guest root built from the committed lock, with the sample's path map; the sample's
    and the root's manifests."""
    from memtrace.tracer.record import guest_image

    guest_image()  # builds the guest image from the lock (cached) if this machine has none yet
    assert (GUEST_ROOT / "usr" / "bin" / "python3.11").is_file()
    with open_trace(SAMPLE) as t:
        traced = t.header["guest_image"]
    built = json.loads((GUEST_ROOT.parent / "manifest.json").read_text())
    return GuestFiles(GUEST_ROOT, ["/zi/*/lib=/usr/lib", "/zi/*/bin=/usr/bin"]), traced, built


def test_sample_trace_sections_with_guest_root(say):
    """The sample against today's build: every mapped file page of a file whose packages have
    the sample's versions is the same on the host; files of packages re-locked since are left
    out, each with its reason, and nothing else is."""
    g, traced, built = sample_guest_root()
    res = analyze(SAMPLE, views=("section", "kind"), guest=g)
    s = res["r"].summary
    changed = {p for p, v in built["packages"].items() if traced["packages"].get(p) != v}
    left = s.get("host_left_out_why", {})
    say(f"sample vs guest root from the lock: compared {s['host_pages_checked']} mapped file "
        f"pages ({s['host_pages_differ']} differ), left out {s['host_pages_left_out']}: "
        f"{left or 'none'}; packages re-locked since the sample: {sorted(changed) or 'none'}")
    assert s["elf_files"] > 10 and s["host_pages_checked"] > 1000
    assert s["host_pages_differ"] == 0
    # only files of re-locked packages are left out, and they are named
    for why in left:
        assert why.split(" ", 1)[0] in changed, why
    assert s["host_pages_left_out"] == sum(left.values())
    secs = [k for k in table(res, "by_section") if not k.startswith("(")]
    assert secs[0] == ".text" and ".rodata" in secs[:3]
    assert "bss" in table(res, "by_kind")
    check_sums(res)


def test_changed_file_of_an_unchanged_package_is_caught(tmp_path):
    """A file whose package kept the sample's version but whose bytes differ still counts as
    differing: the manifest only excuses files of packages whose versions changed."""
    g, traced, built = sample_guest_root()
    files = json.loads((GUEST_ROOT.parent / "rootfs-files.json").read_text())
    candidates = ["/usr/bin/python3.11", "/usr/lib/x86_64-linux-gnu/libc.so.6",
                  "/usr/lib/x86_64-linux-gnu/libm.so.6"]
    same = [f for f in candidates if all(traced["packages"].get(p) == built["packages"][p]
                                         for p in files[f]["packages"])]
    assert same, "every candidate file's package was re-locked since the sample: add one"
    copy = tmp_path / "image"
    shutil.copytree(GUEST_ROOT, copy / "rootfs", symlinks=True)
    for name in ("manifest.json", "rootfs-files.json"):
        shutil.copy2(GUEST_ROOT.parent / name, copy / name)
    exe = copy / "rootfs" / same[0].lstrip("/")
    data = bytearray(exe.read_bytes())
    for off in range(100, len(data), 4096):
        data[off] ^= 0xFF
    exe.write_bytes(data)
    g = GuestFiles(copy / "rootfs", ["/zi/*/lib=/usr/lib", "/zi/*/bin=/usr/bin"])
    s = analyze(SAMPLE, views=("section",), guest=g)["r"].summary
    assert s["host_pages_differ"] > 100
    assert s["host_pages_differ"] < s["host_pages_checked"]


def test_synthetic_data_file_read_into_heaps(tmp_path):
    """The generator's terminal server: a shared library (one copy, shared by mmap: Linux's
    sharing), a data file read into every heap (full CBPS's sharing, all heap)."""
    p = tmp_path / "ts.mtr"
    generate(p, instances=3, epochs=60)
    res = analyze(p, top=3)
    s = res["r"].summary
    kinds = table(res, "by_kind")
    assert kinds["heap"]["saved"] == s["saved"] > 0
    files = table(res, "by_file")
    data = next(iter(files))
    assert data == "(dev 0x800001 ino 200)"
    assert files[data]["saved_copied"] == files[data]["saved"] >= 0.9 * s["saved"]
    lib = files["/usr/lib/libapp.so"]
    assert lib["saved"] == 0 and lib["linux_shared"] == 2 * lib["frames"] == 96
    assert all("heap" in row[4] for row in res["r"].tables["top"].rows)
    check_sums(res)


def test_average_over_samples(tmp_path):
    p = tmp_path / "ts.mtr"
    generate(p, instances=2, epochs=40)
    avg = analyze(p, average=True, interval=2_000_000)
    peak = analyze(p, interval=2_000_000)
    s = avg["r"].summary
    assert s["samples"] > 5
    assert s["saved"] > 0
    assert 0 < s["mapped_frames"] <= peak["r"].summary["mapped_frames"]
    assert "file_pages" not in avg["r"].tables
    check_sums(avg)


def test_at_time(tmp_path):
    # heap copies appear at t=5; --at 3 sees nothing shared, --at 7 sees them
    p = tmp_path / "t.mtr"
    b = Builder(p).at(1)
    task(b, 10, 0xA, "a")
    task(b, 20, 0xB, "b")
    for pid, mm in ((10, 0xA), (20, 0xB)):
        b.w.vma(VmaOp.BRK, pid, mm, 0x1000000, 0x1004000)
    b.page(1, 7).page(2, 8).map(0xA, 0x1000, 1).map(0xB, 0x1000, 2)
    b.at(5).page(2, 7)
    b.at(9).map(0xA, 0x1000, None)
    b.at(10).close()
    assert analyze(p, at=3)["r"].summary["saved"] == 0
    r7 = analyze(p, at=7)["r"]
    assert r7.summary["saved"] == 1 and r7.summary["t"] == 7
    late = analyze(p, at=100)["r"]
    assert late.summary["saved"] == 0 and any("past the trace's end" in n for n in late.notes)


# -- command line -----------------------------------------------------------------------------
def cli(*args: Any, rc: int | None = 0) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([sys.executable, "-m", "memtrace.analyses.cli", *map(str, args)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert "Traceback" not in p.stderr, p.stderr
    if rc is not None:
        assert p.returncode == rc, p.stderr
    return p


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("cli") / "ts.mtr"
    generate(p, instances=3, epochs=60)
    return p


def test_cli_by_selects_the_analysis(synth):
    out = cli(synth, "--by", "kind", "--format", "csv", "--table", "attribution.by_kind",
              "-q").stdout
    lines = out.splitlines()
    assert lines[0].startswith("kind,frames,linux_shared")
    assert lines[1].startswith("heap,")
    doc = json.loads(cli(synth, "--by", "task,file", "--top", "2", "--format", "json",
                         "-q").stdout)
    assert set(doc["results"]) == {"attribution"}
    assert {"by_task", "by_exe", "by_file", "file_pages", "top", "top_copies"} == \
        set(doc["results"]["attribution"]["tables"])
    assert "by_kind" not in doc["results"]["attribution"]["tables"]
    p = cli(synth, "--by", "bogus", rc=2)
    assert "unknown view 'bogus'" in p.stderr


def test_cli_top_and_show_page(synth):
    doc = json.loads(cli(synth, "--top", "3", "--format", "json", "-q").stdout)
    top = doc["results"]["attribution"]["tables"]["top"]["rows"]
    assert len(top) == 3 and all(len(r[1]) == 32 for r in top)
    full = top[0][1]
    tr = open_trace(synth)
    lo, hi = int(full[16:], 16), int(full[:16], 16)
    data = tr.content(lo, hi)
    assert data is not None and page_hash(data) == (lo, hi)
    out = cli(synth, "--show-page", full[:12]).stdout.splitlines()
    assert out[0] == f"content {full}: 4096 bytes"
    first = data[:16]
    assert out[1] == "00000000: " + " ".join(first[i:i + 2].hex() for i in range(0, 16, 2)) + \
        "  " + "".join(chr(c) if 32 <= c < 127 else "." for c in first)
    assert out[2] == "*" and out[-1] == "00001000"


def test_cli_show_page_errors(synth):
    p = cli("--show-page", "0123456789abcdef", rc=1)  # the sample has no content store
    assert "no content store" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    p = cli(synth, "--show-page", "f" * 32, rc=1)
    assert "no content" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    p = cli(synth, "--show-page", "xyz", rc=1)
    assert "not a content hash" in p.stderr
    p = cli(synth, "--show-page", "0", rc=1)
    assert "matches" in p.stderr and "give more digits" in p.stderr
    zero = f"{ZERO_HASH[1]:016x}{ZERO_HASH[0]:016x}"
    assert "(the zero page)" in cli("--show-page", zero).stdout


def test_hexdump_collapses_repeats():
    data = b"ABCDEFGHIJKLMNOP" * 3 + bytes(16) + b"\x00\x01" * 8
    lines = hexdump(data)
    assert lines[0] == "00000000: 4142 4344 4546 4748 494a 4b4c 4d4e 4f50  ABCDEFGHIJKLMNOP"
    assert lines[1] == "*"
    assert lines[2].startswith("00000030: 0000 0000")
    assert lines[3].startswith("00000040: 0001 0001") and lines[3].endswith("." * 16)
    assert lines[4] == "00000050"
    assert len(lines[0]) == len(lines[2]) == 67

