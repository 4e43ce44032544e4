"""Key Object Selection for a triage result (highdicom ``ko``): flags the key source images (PS3.3 A.35.4).

A viewer can jump to the images the model found most suspicious; the document carries no scores (see sr.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from triaged.errors import OutputBuildError
from triaged.outputs.summary import (
    MANUFACTURER,
    KeySlice,
    TriageSummary,
    contributing_equipment,
    header_only,
    instance_uid,
    series_description,
    series_uid,
)


def build_key_object_selection(
    summary: TriageSummary, key_slices: Sequence[KeySlice], *, series_number: int
) -> Dataset:
    """KOS (Part 3 A.35.4) whose content lists the key source images of the result."""
    referenced = [header_only(key.dataset) for key in key_slices]
    unique = list({str(ds.SOPInstanceUID): ds for ds in referenced}.values())
    description = f"{series_description(summary)} key images chosen by {summary.model_name} {summary.model_version}"
    try:
        content = hd.ko.KeyObjectSelection(
            document_title=codes.DCM.OfInterest,
            referenced_objects=unique,
            observer_device_context=hd.sr.ObserverContext(
                observer_type=codes.DCM.Device,
                observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                    uid=instance_uid(summary, "kos", 1000),
                    name=summary.model_name[:64],
                    manufacturer_name=MANUFACTURER,
                    model_name=summary.model_version[:64],
                ),
            ),
            description=description[:1024],
        )
        kos = hd.ko.KeyObjectSelectionDocument(
            evidence=unique,
            content=content,
            series_instance_uid=series_uid(summary, "kos"),
            series_number=series_number,
            sop_instance_uid=instance_uid(summary, "kos", 0),
            instance_number=1,
            manufacturer=MANUFACTURER,
            transfer_syntax_uid=ExplicitVRLittleEndian,
            contributing_equipment=contributing_equipment(summary),
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise OutputBuildError(f"cannot build Key Object Selection: {exc}") from exc
    kos.SeriesDescription = series_description(summary)
    return kos
