"""Metadata assessability gate: decide from DICOM metadata alone whether the model may score a series.

The model was trained on 2-D anatomical brain slices (T1, T1 post-contrast, T2, FLAIR). Diffusion, EPI (fMRI,
perfusion), localizers, derived parameter maps and non-brain series look nothing like that, and a classifier
would still produce confident scores for them, so they are refused before any inference, with the reason.
"""

from __future__ import annotations

import re

from triaged.ml.results import SeriesMeta

BRAIN_BODY_PARTS = frozenset({"BRAIN", "HEAD", "HEADNECK", "HEAD_NECK", "SKULL", "CEREBRUM", "NEURO"})
_REFUSED_DESCRIPTION = {
    "diffusion": r"dwi|dti|diff|adc|trace|tensor|ep2d_diff|resolve|b1000|\bb0\b",
    "EPI / functional": r"epi|ep2d|ep3d|bold|fmri|f_mri|resting|\brest\b|task",
    "perfusion": r"perf|dsc|dce|asl|pcasl|\bpwi\b|cbf|cbv|\bmtt\b|\btt?p\b",
    "localizer": r"locali[sz]er|scout|survey|\bloc\b|3.?plane|tracker|aahead|aascout",
    "field map / calibration": r"field.?map|fmap|b1.?map|calib|shim|asset",
    "angiography": r"\btof\b|angio|\bmra\b|\bmip\b",
    "susceptibility / phase": r"\bswi\b|\bswan\b|phase|\bpha\b",
    "spectroscopy": r"\bsvs\b|\bcsi\b|spectro|\bmrs\b",
    "spine": r"spine|cervical|thoracic|lumbar",
}
_REFUSED_IMAGE_TYPE = {
    "ADC": "diffusion",
    "TRACEW": "diffusion",
    "FA": "diffusion",
    "EADC": "diffusion",
    "DIFFUSION": "diffusion",
    "TENSOR": "diffusion",
    "LOCALIZER": "localizer",
    "MOSAIC": "EPI / functional",
    "PERFUSION": "perfusion",
    "CBF": "perfusion",
    "CBV": "perfusion",
    "MTT": "perfusion",
    "TTP": "perfusion",
    "PHASE": "susceptibility / phase",
    "P": "susceptibility / phase",
    "EPI": "EPI / functional",
    "FIELD_MAP": "field map / calibration",
    "SUBTRACTION": "derived map",
    "SUB": "derived map",
    "MIP": "angiography",
    "PROJECTION IMAGE": "angiography",
}


def gate_reason(meta: SeriesMeta) -> str | None:
    """Return why ``meta`` describes a series the model must not score, or ``None`` if it may be assessed."""
    if meta.modality.strip().upper() != "MR":
        return f"modality {meta.modality or 'missing'} is not MR"
    body = meta.body_part_examined.strip().upper().replace(" ", "_")
    if body and body not in BRAIN_BODY_PARTS:
        return f"body part {meta.body_part_examined} is not brain/head"
    if meta.number_of_slices < 1:
        return "series has no slices"
    if any(b > 0 for b in meta.diffusion_b_values) or meta.diffusion_b_values:
        return "diffusion series (b-values present)"
    scanning = {s.strip().upper() for s in meta.scanning_sequence}
    if "EP" in scanning:
        return "EPI acquisition (ScanningSequence EP): diffusion, functional or perfusion"
    image_type = [v.strip().upper() for v in meta.image_type]
    for value in image_type[2:] if len(image_type) > 2 else image_type:
        if value in _REFUSED_IMAGE_TYPE:
            return f"{_REFUSED_IMAGE_TYPE[value]} image (ImageType {value})"
    if image_type and image_type[0] == "DERIVED" and not ({"MPR", "REFORMATTED", "MPR_THICK"} & set(image_type)):
        return "derived image (ImageType DERIVED) other than a reformat"
    text = f"{meta.series_description} {meta.protocol_name}".lower().replace("-", "_")
    spaced = re.sub(r"[_./]+", " ", text)
    for kind, pattern in _REFUSED_DESCRIPTION.items():
        if re.search(pattern, text) or re.search(pattern, spaced):
            return f"{kind} series (description {meta.series_description or meta.protocol_name!r})"
    return None
