"""Brain-MRI slice classifier: preprocessing, training, evaluation and the inference API.

Only this package imports torch and MONAI; its public API (:mod:`triaged.ml.api`) takes and returns numpy
arrays and frozen dataclasses.
"""

from __future__ import annotations
