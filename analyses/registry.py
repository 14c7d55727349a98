"""The analyses trace-analyze offers. To add one: write its class (see ``analyses.base``) and
list it here; neither the engine nor the command line changes."""

from __future__ import annotations

from analyses.attribution import AttributionAnalysis
from analyses.base import Analysis
from analyses.ksm import KsmAnalysis
from analyses.oracle import OracleAnalysis
from analyses.sharing import SharingAnalysis
from analyses.snapshots import SnapshotVsContinuous

ANALYSES: list[type[Analysis]] = [
    SharingAnalysis,
    OracleAnalysis,
    SnapshotVsContinuous,
    KsmAnalysis,
    AttributionAnalysis,
]
