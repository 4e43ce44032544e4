"""All DICOM objects one triage result becomes, in send order: Secondary Captures, then KOS, then SR.

This package knows nothing of the database or the model: it takes plain summaries (summary.py) and source
datasets and returns datasets whose UIDs are derived from the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from io import BytesIO

from pydicom.dataset import Dataset
from pydicom.uid import UID

from triaged.config import OutputSettings
from triaged.outputs.kos import build_key_object_selection
from triaged.outputs.sc import build_secondary_capture
from triaged.outputs.sr import build_structured_report
from triaged.outputs.summary import SERIES_NUMBER_OFFSET, BuiltOutput, KeySlice, TriageSummary


def build_outputs(
    summary: TriageSummary,
    key_slices: Sequence[KeySlice],
    evidence: Sequence[Dataset],
    options: OutputSettings,
    *,
    fallback_slice: Dataset | None = None,
) -> list[BuiltOutput]:
    """All objects for one result, in send order (SCs, then KOS, then SR), honouring ``options``.

    ``evidence`` are the source datasets the KOS/SR reference (headers suffice); ``fallback_slice`` is the
    slice shown on a "not assessed" SC when ``options.not_assessable == "sc"``.
    """
    if options.mode == "none" or (options.mode == "urgent" and not summary.urgent):
        return []
    built: list[BuiltOutput] = []
    base = options.series_number
    if not summary.assessed:
        if options.not_assessable == "sc" and fallback_slice is not None:
            sc = build_secondary_capture(summary, KeySlice(fallback_slice), index=0, total=1, series_number=base)
            built.append(BuiltOutput("sc", 0, sc))
        elif options.not_assessable == "sr":
            sr = build_structured_report(summary, [], evidence, series_number=base + SERIES_NUMBER_OFFSET["sr"])
            built.append(BuiltOutput("sr", 0, sr))
        return built
    if options.secondary_captures:
        for index, key in enumerate(key_slices):
            sc = build_secondary_capture(summary, key, index=index, total=len(key_slices), series_number=base)
            built.append(BuiltOutput("sc", index, sc))
    if options.key_object_selection and key_slices:
        kos = build_key_object_selection(summary, key_slices, series_number=base + SERIES_NUMBER_OFFSET["kos"])
        built.append(BuiltOutput("kos", 0, kos))
    if options.structured_report:
        sr = build_structured_report(summary, key_slices, evidence, series_number=base + SERIES_NUMBER_OFFSET["sr"])
        built.append(BuiltOutput("sr", 0, sr))
    return built


def encode(dataset: Dataset) -> bytes:
    """The Part 10 file bytes of ``dataset`` (preamble, file meta, dataset in its transfer syntax)."""
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def transfer_syntax(dataset: Dataset) -> UID:
    return UID(dataset.file_meta.TransferSyntaxUID)
