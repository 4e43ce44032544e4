"""The ML layer's public interface: plain frozen dataclasses and numpy arrays, no torch types.

``pipeline.py`` fills :class:`SeriesMeta` from DICOM and calls :meth:`Triage.assess`.
"""

from __future__ import annotations

from triaged.ml.inference import Triage
from triaged.ml.registry import build_random_model_dir
from triaged.ml.results import SeriesAssessment, SeriesMeta

__all__ = ["SeriesAssessment", "SeriesMeta", "Triage", "build_random_model_dir"]
