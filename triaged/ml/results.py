"""Result and metadata dataclasses of the ML interface (re-exported by :mod:`triaged.ml.api`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class SliceGeometry:
    """Where the slices of a series lie, in DICOM patient coordinates (LPS, mm), in the order they are given."""

    orientation: tuple[float, ...]  # ImageOrientationPatient: row direction then column direction
    positions: tuple[tuple[float, float, float], ...]  # ImagePositionPatient of each slice
    pixel_spacing: tuple[float, float]  # (between rows, between columns)


@dataclass(frozen=True)
class SeriesMeta:
    """Series metadata needed by the assessability gate (filled by the pipeline; ml never imports pydicom)."""

    modality: str
    body_part_examined: str
    series_description: str
    protocol_name: str
    image_type: tuple[str, ...]
    scanning_sequence: tuple[str, ...]
    sequence_variant: tuple[str, ...]
    diffusion_b_values: tuple[float, ...]
    number_of_slices: int
    echo_time: float | None = None  # ms; None where the header does not say
    repetition_time: float | None = None
    inversion_time: float | None = None
    geometry: SliceGeometry | None = None  # where the slices lie; lets a 3-D volume be scored in the axial plane


@dataclass(frozen=True)
class SeriesAssessment:
    """Result of assessing one series; ``urgent`` is never True when ``assessable`` is False."""

    assessable: bool
    reason: str | None
    label: str | None
    class_probabilities: dict[str, float]
    urgency: float | None
    threshold: float
    urgent: bool
    slice_probabilities: np.ndarray
    slice_in_brain: np.ndarray
    key_slice_indices: tuple[int, ...]
    cams: dict[int, np.ndarray]
    ood_score: float | None
    timings: dict[str, float]
    # Set when the slices scored are not the acquired ones (a 3-D volume reformatted to axial): what was done,
    # and each key slice's image, since no stored instance holds it.
    reformat: str | None = None
    key_images: dict[int, np.ndarray] = field(default_factory=dict)
