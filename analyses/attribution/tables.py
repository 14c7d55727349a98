"""Grouping an attribution into views, and the result tables built from them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from memtrace.analyses.attribution.attributor import (
    HOW,
    KINDS,
    M_CROSS,
    M_FRAMES,
    M_LINUX,
    M_SAVED,
    M_SELF,
    M_SHAREABLE,
    METRICS,
    NM,
    NO_FILE,
    Attribution,
    Attributor,
)
from memtrace.analyses.attribution.frozen import StateView
from memtrace.analyses.attribution.showpage import hash_hex
from memtrace.analyses.base import Table


def group(att: Attribution, keys: Sequence[Any], sel: np.ndarray | None = None
          ) -> dict[Any, np.ndarray]:
    """Sum the metric rows of the pairs by ``keys`` (one hashable per pair)."""
    ids: dict[Any, int] = {}
    rows = range(len(keys)) if sel is None else np.flatnonzero(sel).tolist()
    gi = np.fromiter((ids.setdefault(keys[p], len(ids)) for p in rows), dtype=np.int64,
                     count=len(rows))
    m = att.metrics if sel is None else att.metrics[sel]
    sums = np.zeros((len(ids), NM))
    for j in range(NM):
        sums[:, j] = np.bincount(gi, weights=m[:, j], minlength=len(ids))
    return {k: sums[i] for k, i in ids.items()}


def views_of(att: Attribution, attributor: Attributor, st: StateView
             ) -> dict[str, dict[Any, Any]]:
    """Every grouped view of one instant: view name -> {key: metric sums}."""
    names = [a[1] for a in att.spaces]
    fname = [attributor.file_name(st, *k) for k in att.files]
    sp = att.space.tolist()
    fi = att.file.tolist()
    hw = att.how.tolist()
    no = NO_FILE
    out: dict[str, dict[Any, Any]] = {
        "task": group(att, [(f"{att.spaces[s][0]:#x}", names[s], att.spaces[s][2]) for s in sp]),
        "exe": group(att, [att.spaces[s][2] for s in sp]),
        "kind": group(att, [KINDS[k] for k in att.kind.tolist()]),
        "file": group(att, [(fname[f] if f >= 0 else no, HOW[h] if f >= 0 else "")
                            for f, h in zip(fi, hw, strict=True)]),
        "section": group(att, att.section),
        "file_section": group(att, [(fname[f] if f >= 0 else no, g, s)
                                    for f, g, s in zip(fi, att.segment, att.section,
                                                       strict=True)]),
    }
    # spaces per executable, for the exe table
    exes: dict[str, int] = {}
    for a in att.spaces:
        exes[a[2]] = exes.get(a[2], 0) + 1
    out["exe_spaces"] = exes
    return out


def round2(x: float) -> float:
    return round(float(x), 2)


def pct(x: float, total: float) -> float:
    return round(100.0 * x / total, 1) if total else 0.0


def sorted_by_saving(d: dict[Any, np.ndarray]) -> list[tuple[Any, np.ndarray]]:
    return sorted(d.items(), key=lambda kv: (-kv[1][M_SAVED], -kv[1][M_LINUX],
                                             -kv[1][M_FRAMES], str(kv[0])))


def zero_self(views: dict[str, dict[Any, Any]]) -> float:
    """Self saving of the zero page's content (from the kind view, where zero is its own kind)."""
    z = views.get("kind", {}).get("zero")
    return float(z[M_SELF]) if z is not None else 0.0


def file_table(d: dict[tuple[str, str], np.ndarray], saved: float) -> Table:
    """One row per file: its frames and savings, split by how the frames hold its pages."""
    files: dict[str, np.ndarray] = {}
    split: dict[str, dict[str, float]] = {}
    for (name, how), v in d.items():
        files[name] = files.get(name, 0) + v
        s = split.setdefault(name, {})
        s[how] = s.get(how, 0.0) + float(v[M_SAVED])
    out = []
    for name, v in sorted_by_saving(files):
        s = split[name]
        out.append([name, *(round2(x) for x in v), round2(s.get("mapped", 0)),
                    round2(s.get("cow", 0) + s.get("bss", 0)), round2(s.get("copied", 0)),
                    pct(v[M_SAVED], saved)])
    return Table(["file", *METRICS, "saved_mapped", "saved_private", "saved_copied",
                  "saved_pct"], out,
                 "by file: saved_mapped from its page-cache pages, saved_private from "
                 "private copies in its mappings (cow, .bss), saved_copied from anonymous "
                 "pages with the content of one of its pages (e.g. read into the heap)")


def file_pages(att: Attribution, attributor: Attributor, st: StateView) -> Table:
    """Every shareable page tied to a file: file, offset, section, how, copies, saving."""
    sel = (att.file >= 0) & (att.metrics[:, M_SHAREABLE] > 0)
    names = [attributor.file_name(st, *k) for k in att.files]
    keys = [(names[int(att.file[p])], int(att.offset[p]), att.segment[p], att.section[p],
             HOW[int(att.how[p])], int(att.copies[p])) if sel[p] else None
            for p in range(len(att.file))]
    d = group(att, keys, sel)
    rows = [[k[0], f"{k[1]:#x}", k[2], k[3], k[4], k[5], round2(v[M_FRAMES]), round2(v[M_SAVED]),
             round2(v[M_SELF]), round2(v[M_CROSS])]
            for k, v in sorted(d.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][4]))]
    return Table(["file", "offset", "segment", "section", "how", "copies", "frames", "saved",
                  "saved_self", "saved_cross"], rows,
                 "shareable pages tied to a file, by file and offset")


def top_tables(att: Attribution, attributor: Attributor, st: StateView, ntop: int
               ) -> tuple[Table, Table]:
    """The K contents with the most copies among mapped frames, and every copy's owner."""
    lo, hi = st.contents.lo, st.contents.hi
    shared = np.flatnonzero(att.copies >= 2)
    cids, first = np.unique(att.cid[shared], return_index=True)
    ncopies = dict(zip(cids.tolist(), att.copies[shared[first]].tolist(), strict=True))
    order = sorted(ncopies, key=lambda c: (-ncopies[c], hash_hex(int(lo[c]), int(hi[c]))))
    chosen = order[:ntop]
    rank = {c: i + 1 for i, c in enumerate(chosen)}
    names = [attributor.file_name(st, *k) for k in att.files]
    top_rows: list[list[Any]] = []
    copy_rows: list[list[Any]] = []
    per: dict[int, list[int]] = {c: [] for c in chosen}
    for p in np.flatnonzero(np.isin(att.cid, chosen)).tolist():
        per[int(att.cid[p])].append(p)
    ps = st.page_size
    for c in chosen:
        h = hash_hex(int(lo[c]), int(hi[c]))
        owners: dict[tuple[str, str], int] = {}
        kinds: dict[str, int] = {}
        for p in sorted(per[c], key=lambda p: (int(att.space[p]), int(att.vpn[p]))):
            who = att.spaces[int(att.space[p])][1]
            k = KINDS[int(att.kind[p])]
            fi = int(att.file[p])
            owners[(who, k)] = owners.get((who, k), 0) + 1
            kinds[k] = kinds.get(k, 0) + 1
            copy_rows.append([rank[c], h, int(att.frame[p]), who,
                              f"{int(att.vpn[p]) * ps:#x}", k, names[fi] if fi >= 0 else "",
                              f"{int(att.offset[p]):#x}" if fi >= 0 else "",
                              att.section[p] if fi >= 0 else ""])
        summary = "; ".join(f"{who} {k} x{n}" for (who, k), n in
                            sorted(owners.items(), key=lambda kv: (-kv[1], kv[0])))
        top_rows.append([rank[c], h, ncopies[c], ncopies[c] - 1,
                         " ".join(f"{k}:{n}" for k, n in sorted(kinds.items())), summary])
    top = Table(["rank", "hash", "copies", "saved", "kinds", "owners"], top_rows,
                "the most duplicated contents among mapped frames (hash: give it, or a "
                "prefix, to --show-page)")
    copies = Table(["rank", "hash", "frame", "owner", "address", "kind", "file", "offset",
                    "section"], copy_rows,
                   "every mapping of the top contents' copies (one row per address space "
                   "and frame)")
    return top, copies
