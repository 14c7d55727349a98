"""The thesis's evaluation (seed chapter 5) as a built-in study: ``trace-study thesis``.

Three workloads of 1, 2 and 3 instances each, K runs of every configuration (the thesis took
the median of 6; ``--quick``: 1): the terminal server and the zero-install terminal server
(Table 5.1, Figures 5.3 and 5.4; Table 5.2 from zero-install) and the game server (Table 5.3,
Figure 5.5). Every trace gets the four figures (``--sharing``), the oracle, snapshots against
the continuous view and the KSM model at the kernel's default settings (100 pages every 20 ms)
over every anonymous page, as the thesis's "KSM hint all" assumes (``--ksm-scope anon``: the
scenarios madvise nothing, so the default scope would merge nothing).

The thesis ran desktop sessions (Xfce, Firefox, LibreOffice) and CS:GO servers. The study runs
them on real software: trace-record's ``desktop`` scenario (``--layout terminal-server`` and
``zero-install``) and ``game-server`` (OpenArena servers). A desktop user takes minutes of
emulated time to come up, so ``miniatures=True`` (``trace-study thesis --miniatures``, what CI
runs) swaps in the miniature scenarios (Python interpreters per user, ``server-heap``), and the
report says so (``STAND_INS``).
"""

from __future__ import annotations

from memtrace.studies.studyfile import Study, parse

#: the thesis's published figures (DESIGN.md, "The thesis's published figures")
FIGURES = ("no_sharing", "mmap_fork", "ksm_hint_all", "full_cbps")
FIGURE_NAMES = {"no_sharing": "no sharing", "mmap_fork": "mmap/fork",
                "ksm_hint_all": "KSM hint all", "full_cbps": "full CBPS"}
#: Table 5.1, relative to the single-user mmap/fork case (480 MiB): columns 1 user, 2 users
#: terminal, 2 users zero-install, 3 users terminal, 3 users zero-install
TABLE_5_1 = {"no_sharing": (1.10, 2.20, 2.20, 3.32, 3.33),
             "mmap_fork": (1.00, 1.83, 1.99, 2.68, 3.02),
             "ksm_hint_all": (0.48, 0.64, 0.83, 0.81, 1.20),
             "full_cbps": (0.45, 0.60, 0.61, 0.77, 0.78)}
TABLE_5_1_BASE_MIB = 480
#: Table 5.2, shareable pages by type in the zero-install scenario, 1, 2, 3 users
TABLE_5_2 = {"anonymous": (29707, 43520, 60480), "named": (25490, 30564, 35675),
             "mixed": (1, 1, 1)}
#: Table 5.3, CS:GO servers relative to one server (147 MiB), 1, 2, 3 servers
TABLE_5_3 = {"no_sharing": (1.00, 2.00, 3.00), "mmap_fork": (1.00, 1.99, 2.97),
             "ksm_hint_all": (0.97, 1.44, 1.90), "full_cbps": (0.97, 1.34, 1.70)}
TABLE_5_3_BASE_MIB = 147

#: the thesis's workloads -> (scenario, its trace-record options) on real software
REAL = {"terminal-server": ("desktop", {"layout": "terminal-server"}),
        "zero-install": ("desktop", {"layout": "zero-install"}),
        "game-server": ("game-server", {})}
#: the thesis's workloads -> the miniature scenario that stands in for it
MINIATURES = {"terminal-server": "terminal-server", "zero-install": "zero-install",
              "game-server": "server-heap"}
STAND_INS = {
    "terminal-server": "the thesis's terminal server ran a desktop session per user (Xfce, "
                       "Firefox, LibreOffice from one installation); the `terminal-server` "
                       "miniature runs one Python interpreter per user from one installation",
    "zero-install": "the thesis's zero-install case ran each user's desktop applications "
                    "from a copy of their own; the `zero-install` miniature runs one Python "
                    "interpreter per user, each from its own copy of python and its libraries",
    "game-server": "the thesis ran CS:GO servers (map data decompressed into the heap); the "
                   "`server-heap` miniature runs processes reading the same data file into "
                   "anonymous memory",
}
REPEATS = 6  # the thesis's median of 6 runs


def thesis_study(quick: bool = False, repeats: int | None = None,
                 miniatures: bool = False) -> Study:
    """The study: every configuration ``repeats`` times (6, or 1 with ``quick``), on the real
    software or (``miniatures``) on the miniature scenarios."""
    k = repeats or (1 if quick else REPEATS)
    lines = ["[study]", 'name = "thesis"', f"repeats = {k}", ""]
    for w, (scenario, opts) in REAL.items():
        if miniatures:
            scenario, opts = MINIATURES[w], {}
        lines += ["[[workload]]", f'name = "{w}"', f'scenario = "{scenario}"', "n = [1, 2, 3]"]
        lines += [f'{key} = "{value}"' for key, value in opts.items()] + [""]
    lines += ["[analyses.sharing]", "[analyses.oracle]", "[analyses.snapshot_vs_continuous]",
              "[analyses.ksm]", 'scope = "anon"', ""]
    study = parse("\n".join(lines), "<built-in thesis study>")
    study.builtin = "thesis"
    if miniatures:
        study.notes += [STAND_INS[w] for w in REAL]
    return study
