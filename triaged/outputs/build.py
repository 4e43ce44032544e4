"""All DICOM objects one triage result becomes, in send order: Secondary Captures, then KOS, then SR.

This package knows nothing of the database or the model: it takes plain summaries (summary.py) and source
datasets and returns datasets whose UIDs are derived from the result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from io import BytesIO

import structlog
from pydicom.dataset import Dataset
from pydicom.uid import UID

from triaged.config import OutputSettings
from triaged.errors import OutputBuildError
from triaged.log import uid_hash
from triaged.outputs.headers import HeaderRepairs, clean_copied_attributes
from triaged.outputs.kos import build_key_object_selection
from triaged.outputs.sc import build_secondary_capture
from triaged.outputs.sr import build_structured_report
from triaged.outputs.summary import SERIES_NUMBER_OFFSET, BuiltOutput, KeySlice, OutputKindName, TriageSummary

log = structlog.get_logger()

_Builder = Callable[[], Dataset]


def _clean(
    key_slices: Sequence[KeySlice], evidence: Sequence[Dataset], fallback_slice: Dataset | None
) -> tuple[list[KeySlice], list[Dataset], Dataset | None, HeaderRepairs]:
    """Every source dataset with its copied attributes made valid (headers.py), and what was changed."""
    repairs = HeaderRepairs()

    def clean(dataset: Dataset) -> Dataset:
        cleaned, changed = clean_copied_attributes(dataset)
        repairs.update(changed)
        return cleaned

    keys = [replace(key, dataset=clean(key.dataset)) for key in key_slices]
    sources = [clean(dataset) for dataset in evidence]
    fallback = clean(fallback_slice) if fallback_slice is not None else None
    return keys, sources, fallback, repairs


def _attempt(built: list[BuiltOutput], failed: list[str], kind: OutputKindName, index: int, make: _Builder) -> None:
    """Build one object; a failure costs that object only (logged by kind, never with header values)."""
    try:
        built.append(BuiltOutput(kind, index, make()))
    except OutputBuildError as exc:
        failed.append(f"{kind}-{index}")
        log.warning("output_build_failed", kind=kind, index=index, error=type(exc.__cause__ or exc).__name__)


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
    slice shown on a "not assessed" SC when ``options.not_assessable == "sc"``. Invalid copied header values
    are repaired or left out first (logged once, by keyword); an object that still fails to build is left
    out and the others are built. Raises :class:`OutputBuildError` only when every object failed.
    """
    if options.mode == "none" or (options.mode == "urgent" and not summary.urgent):
        return []
    key_slices, evidence, fallback_slice, repairs = _clean(key_slices, evidence, fallback_slice)
    if repairs:
        log.warning(
            "output_headers_repaired",
            series_uid=uid_hash(summary.series_instance_uid),
            repaired=sorted(repairs.repaired),
            left_out=sorted(repairs.emptied),
        )
    built: list[BuiltOutput] = []
    failed: list[str] = []
    base = options.series_number
    sr_number = base + SERIES_NUMBER_OFFSET["sr"]
    if not summary.assessed:
        if options.not_assessable == "sc" and fallback_slice is not None:
            fallback = KeySlice(fallback_slice)
            _attempt(
                built,
                failed,
                "sc",
                0,
                lambda: build_secondary_capture(summary, fallback, index=0, total=1, series_number=base),
            )
        elif options.not_assessable == "sr":
            _attempt(
                built, failed, "sr", 0, lambda: build_structured_report(summary, [], evidence, series_number=sr_number)
            )
    else:
        if options.secondary_captures:
            for index, key in enumerate(key_slices):
                _attempt(
                    built,
                    failed,
                    "sc",
                    index,
                    partial(
                        build_secondary_capture,
                        summary,
                        key,
                        index=index,
                        total=len(key_slices),
                        series_number=base,
                    ),
                )
        # A KOS can only point at acquired images; slices of an axial reformat have none to point at.
        acquired = [key for key in key_slices if not key.reformatted]
        if options.key_object_selection and acquired:
            kos_number = base + SERIES_NUMBER_OFFSET["kos"]
            _attempt(
                built,
                failed,
                "kos",
                0,
                lambda: build_key_object_selection(summary, acquired, series_number=kos_number),
            )
        if options.structured_report:
            _attempt(
                built,
                failed,
                "sr",
                0,
                lambda: build_structured_report(summary, key_slices, evidence, series_number=sr_number),
            )
    if failed and not built:
        raise OutputBuildError(f"no output could be built ({', '.join(failed)} failed; see output_build_failed)")
    return built


def encode(dataset: Dataset) -> bytes:
    """The Part 10 file bytes of ``dataset`` (preamble, file meta, dataset in its transfer syntax)."""
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def transfer_syntax(dataset: Dataset) -> UID:
    return UID(dataset.file_meta.TransferSyntaxUID)
