"""Brain-MRI slice classifier as the daemon loads it: preprocessing, network, inference, gate, aggregation, Grad-CAM.

Training and evaluation live in :mod:`triaged.training`, which may import this package, never the reverse.

Only this package imports torch and MONAI; its public API (:mod:`triaged.ml.api`) takes and returns numpy
arrays and frozen dataclasses.
"""

from __future__ import annotations
