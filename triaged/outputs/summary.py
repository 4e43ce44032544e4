"""Plain types and identities shared by the output builders: summaries, key slices, derived UIDs.

Every UID is derived from the result (model sha256, source series UID, generation, kind, index), so a
rebuilt or re-sent object is the same instance to the PACS, which then de-duplicates it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

OutputKindName = Literal["sc", "kos", "sr"]
MANUFACTURER = "triaged"
MANUFACTURER_MODEL_NAME = "triaged brain MRI triage"
URGENT_PREFIX = "AI TRIAGE URGENT:"
ROUTINE_PREFIX = "AI TRIAGE:"
SERIES_NUMBER_OFFSET: dict[OutputKindName, int] = {"sc": 0, "kos": 1, "sr": 2}


@dataclass(frozen=True)
class TriageSummary:
    """What the pipeline decided for one series generation (a plain copy of the ``results`` row)."""

    series_instance_uid: str
    generation: int
    status: Literal["assessed", "not_assessable"]
    model_name: str
    model_version: str
    model_sha256: str
    label: str | None = None
    probabilities: Mapping[str, float] = field(default_factory=dict)
    urgency: float | None = None
    threshold: float | None = None
    urgent: bool = False
    reason: str | None = None

    @property
    def assessed(self) -> bool:
        return self.status == "assessed"


@dataclass(frozen=True)
class KeySlice:
    """One source slice to show: its dataset (with pixels), 1-based frame for multi-frame, Grad-CAM map.

    ``pixels`` is set for a slice of an axial reformat: the image itself, which no received instance holds;
    ``dataset`` is then the volume's reference instance (its headers, never its pixels, are used).
    """

    dataset: Dataset
    frame_number: int | None = None
    cam: NDArray[np.floating] | None = None
    tumour_probability: float | None = None
    pixels: NDArray[np.floating] | None = None

    @property
    def reformatted(self) -> bool:
        return self.pixels is not None


@dataclass(frozen=True)
class BuiltOutput:
    kind: OutputKindName
    index: int
    dataset: Dataset

    @property
    def sop_instance_uid(self) -> str:
        return str(self.dataset.SOPInstanceUID)

    @property
    def sop_class_uid(self) -> str:
        return str(self.dataset.SOPClassUID)

    @property
    def series_instance_uid(self) -> str:
        return str(self.dataset.SeriesInstanceUID)


def derived_uid(summary: TriageSummary, *parts: str) -> str:
    """A ``2.25.<int>`` UID (PS3.5 B.2) that is a pure function of the result and ``parts``.

    (pydicom's ``generate_uid(prefix=None, ...)`` ignores its entropy sources, so hash ourselves.)
    """
    sources = [summary.model_sha256, summary.series_instance_uid, str(summary.generation), *parts]
    digest = hashlib.sha256("\x1f".join(sources).encode("utf-8")).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def series_uid(summary: TriageSummary, kind: OutputKindName) -> str:
    return derived_uid(summary, "series", kind)


def instance_uid(summary: TriageSummary, kind: OutputKindName, index: int) -> str:
    return derived_uid(summary, "instance", kind, str(index))


def distinct_digits(value: float, other: float, *, minimum: int = 2, maximum: int = 6) -> tuple[str, str]:
    """``value`` and ``other`` with the fewest decimals (at least ``minimum``) that keep them apart.

    So a banner never reads "0.99 < threshold 0.99": the printed numbers differ, and compare the same way as
    the numbers themselves, whenever the numbers differ by at least 10**-maximum.
    """
    for digits in range(minimum, maximum + 1):
        a, b = f"{value:.{digits}f}", f"{other:.{digits}f}"
        if (float(a) > float(b)) == (value > other) and (float(a) < float(b)) == (value < other):
            return a, b
    return f"{value:.{maximum}f}", f"{other:.{maximum}f}"


def decision_line(summary: TriageSummary, *, ascii_only: bool = False) -> str:
    """``Urgency 0.9938 < threshold 0.9942 → not urgent``: the banner's and the SR's wording of the decision.

    ``ascii_only`` for text stored in DICOM (the source's character set may be the default repertoire).
    """
    if summary.urgency is None or summary.threshold is None:
        urgency = "-" if summary.urgency is None else f"{summary.urgency:.2f}"
        threshold = "-" if summary.threshold is None else f"{summary.threshold:.2f}"
    else:
        urgency, threshold = distinct_digits(summary.urgency, summary.threshold)
    relation = (">=" if ascii_only else "≥") if summary.urgent else "<"
    arrow = "->" if ascii_only else "→"
    return f"Urgency {urgency} {relation} threshold {threshold} {arrow} {'URGENT' if summary.urgent else 'not urgent'}"


def pretty_label(label: str | None) -> str:
    return {"notumor": "no tumour", None: "none"}.get(label, str(label))


def series_description(summary: TriageSummary) -> str:
    """`AI TRIAGE URGENT: …` / `AI TRIAGE: …`, at most 64 characters (LO)."""
    if not summary.assessed:
        text = f"{ROUTINE_PREFIX} not assessable"
    elif summary.urgent:
        text = f"{URGENT_PREFIX} suspected {pretty_label(summary.label)}"
    else:
        text = f"{ROUTINE_PREFIX} {pretty_label(summary.label)} (below threshold)"
    return text[:64]


def contributing_equipment(summary: TriageSummary) -> list[hd.ContributingEquipment]:
    return [
        hd.ContributingEquipment(
            manufacturer=MANUFACTURER,
            purpose_of_reference=codes.DCM.ProcessingEquipment,
            manufacturer_model_name=summary.model_name[:64],
            software_versions=summary.model_version[:64],
            contribution_description=f"AI triage model sha256 {summary.model_sha256[:16]}",
        )
    ]


def header_only(dataset: Dataset) -> Dataset:
    """A copy without pixel data: the evidence lists need identities, not pixels."""
    copy = Dataset()
    for element in dataset:
        if element.tag.group != 0x7FE0:
            copy.add(element)
    return copy
