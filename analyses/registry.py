"""The analyses trace-analyze offers. To add one: write its class (see ``analyses.base``) and
list it here; neither the engine nor the command line changes."""

from __future__ import annotations

from memtrace.analyses.attribution.analysis import AttributionAnalysis
from memtrace.analyses.base import Analysis
from memtrace.analyses.ksm.analysis import KsmAnalysis
from memtrace.analyses.oracle import OracleAnalysis
from memtrace.analyses.sharing import SharingAnalysis
from memtrace.analyses.snapshots import SnapshotVsContinuous

ANALYSES: list[type[Analysis]] = [
    SharingAnalysis,
    OracleAnalysis,
    SnapshotVsContinuous,
    KsmAnalysis,
    AttributionAnalysis,
]
