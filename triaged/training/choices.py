"""Names of the training levers' settings, without their implementations.

``triaged train`` checks its options against these before anything heavy is imported (`triaged --help` and a
mistyped option must not pay for numpy, torch or MONAI); :mod:`triaged.training.sampling` and
:mod:`triaged.training.augment` implement them.
"""

from __future__ import annotations

SAMPLINGS = ("uniform", "balanced", "kaggle_contrast")
AUGMENTS = ("standard", "scanner", "strip")  # strip: standard + a random skull strip
