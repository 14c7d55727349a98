"""trace-cache: show what the build cache holds (items, sizes) and remove it.

A command of its own rather than trace-record options: it is about the cache every command that
builds shares, not about one recording, and it runs without QEMU or a guest.
"""

from __future__ import annotations

import argparse
import sys

from memtrace.tracer import cache


def human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="trace-cache", description=__doc__.splitlines()[0])
    ap.add_argument("--cache", metavar="DIR",
                    help="the cache (default $MEMTRACE_CACHE, else $XDG_CACHE_HOME/memtrace, "
                         "~/.cache/memtrace)")
    ap.add_argument("--clean", nargs="*", metavar="ITEM",
                    help="remove these items (guest, tracer, qemu10, ...), or all of them")
    a = ap.parse_args(argv)
    if a.cache:
        cache.set_root(a.cache)
    root = cache.root()
    if a.clean is not None:
        known = {n.split(".new-")[0].split(".old-")[0].lstrip(".") for n, _ in cache.items()}
        unknown = [n for n in a.clean if n not in known]
        if unknown:
            print(f"trace-cache: error: no item {', '.join(unknown)} in {root} (it holds: "
                  f"{', '.join(sorted(known)) or 'nothing'})", file=sys.stderr)
            sys.exit(2)
        removed = cache.clean(a.clean or None)
        print(f"{root}: removed {', '.join(removed) if removed else 'nothing'}")
        return
    listing = cache.items()
    print(f"cache: {root}" + ("" if listing else " (empty)"))
    for name, size in listing:
        print(f"  {human(size):>10}  {name}")
    if listing:
        print(f"  {human(sum(s for _, s in listing)):>10}  total")


if __name__ == "__main__":
    main()
