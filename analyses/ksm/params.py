"""KSM parameters: one set as in /sys/kernel/mm/ksm, the batch cycle in a ticking kernel, and the
command-line parsers for them."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from fractions import Fraction

from memtrace.analyses.base import positive_int

#: the sysfs knobs a guest scenario may report, and the model parameter each one is
KNOBS = {"pages_to_scan": "pages_to_scan", "sleep_millisecs": "sleep_ms",
         "max_page_sharing": "max_page_sharing", "use_zero_pages": "use_zero_pages"}


@dataclass(frozen=True)
class KsmParams:
    """One parameter set, as in /sys/kernel/mm/ksm, plus the scanner flavour."""

    pages_to_scan: int = 100
    sleep_ms: float = 20.0
    max_page_sharing: int = 256
    use_zero_pages: bool = False
    scanner: str = "linear"  # or "hinted"

    @property
    def label(self) -> str:
        return f"{self.pages_to_scan}:{self.sleep_ms:g}" + (
            "+hints" if self.scanner == "hinted" else "")

    def scan_rate(self) -> float:
        """Pages per second of guest time."""
        return self.pages_to_scan * 1000.0 / self.sleep_ms


def cycle_ms(sleep_ms: float, tick_hz: int) -> Fraction:
    """Guest milliseconds from one ksmd batch to the next in a kernel ticking at ``tick_hz``.

    ``ksm_scan_thread`` sleeps ``msecs_to_jiffies(sleep_millisecs)`` jiffies (rounded up), and
    the timer wheel never fires early: ``calc_index`` puts a timer in the bucket one jiffy after
    its expiry, so a timer armed during jiffy j with a timeout of J fires at the start of jiffy
    j + J + 1. ksmd wakes on a tick, scans (about 1 ms for 100 pages under TCG) and sleeps
    again within the same jiffy, so batches are ``J + 1`` jiffies apart: 56 ms for 50 ms at
    HZ=250, 24 ms for 20 ms. ``tick_hz`` 0: exactly ``sleep_ms``.
    """
    ms = Fraction(str(sleep_ms))
    if tick_hz <= 0:
        return ms
    j = math.ceil(ms * tick_hz / 1000)
    return Fraction((j + 1) * 1000, tick_hz)


def positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
    if not v > 0 or not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be positive: {s!r}")
    return v


def max_sharing(s: str) -> int:
    v = positive_int(s)
    if v < 2:
        # max_page_sharing_store: "When a KSM page is created it is shared by 2 mappings"
        raise argparse.ArgumentTypeError("max_page_sharing must be at least 2 (as in the kernel)")
    return v


def parse_sweep(s: str) -> list[tuple[int, float]]:
    """``"100:20,1000:20"`` -> [(100, 20.0), (1000, 20.0)] (pages_to_scan:sleep_ms pairs)."""
    out = []
    for part in s.split(","):
        part = part.strip()
        if not part:
            continue
        a, sep, b = part.partition(":")
        if not sep:
            raise argparse.ArgumentTypeError(
                f"--ksm-sweep: {part!r} is not PAGES:SLEEP_MS (e.g. 100:20,1000:20)")
        out.append((positive_int(a), positive_float(b)))
    if not out:
        raise argparse.ArgumentTypeError("--ksm-sweep: no PAGES:SLEEP_MS pair")
    return out


def parse_start(s: str) -> str:
    if s.startswith("phase:") and len(s) > 6:
        return s
    try:
        float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--ksm-start: {s!r} is neither a time in clock units nor phase:NAME") from None
    return s
