"""What receiving and delivering share: pixels, UIDs, presentation contexts, Part 10 files, synthetic series.

The output side (building and delivering our objects) lives in :mod:`triaged.outputs`. Only ``dicom``,
``receive`` and ``outputs`` import pynetdicom (style section 1).
"""

from __future__ import annotations
