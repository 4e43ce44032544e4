"""What receiving and delivering share: pixels, UIDs, presentation contexts, Part 10 files, synthetic series.

Only ``dicom``, ``receive`` and the delivering side import pynetdicom (style section 1).
"""

from __future__ import annotations
