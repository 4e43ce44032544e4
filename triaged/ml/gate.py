"""Metadata assessability gate: decide from DICOM metadata alone whether the model may score a series.

The model was trained on 2-D anatomical brain slices (T1, T1 post-contrast, T2, FLAIR). Diffusion, EPI (fMRI,
perfusion), localizers, derived parameter maps and non-brain series look nothing like that, and a classifier
would still produce confident scores for them, so they are refused before any inference, with the reason.

Contrasts the model never learned (proton density, T2*/susceptibility-weighted gradient echo) are refused too: a
normal proton-density series once scored 0.999 "meningioma". They are recognised by name and, because names vary by
site, by their timing (PS3.3 C.8.3.1: EchoTime, RepetitionTime, InversionTime in ms) together with the
ScanningSequence. Vendor option names (GE ASSET/ARC/PROPELLER, Siemens BLADE, Philips SENSE/CS) name how an
anatomical series was accelerated or motion-corrected, not what it is, and never refuse one.
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
    "field map / calibration": (r"field.?map|fmap|b1.?map|calibration|\bcal\b|shim|asset.?cal|sense.?ref|\bref.?scan"),
    "proton density": r"\bpd\b|\bpdw|proton.?dens|\bpd.?t2\b|\bdp\b",
    "T2* gradient echo": r"t2\*|t2.?star|\bmerge\b|hemo|\bgre.?t2|t2.?gre|\bt2.?ffe|\bffe.?t2",
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


# Timing rules (ms). Spin echo without inversion, long TR and short TE is proton density; T1 spin echo has a short
# TR and T2 a long TE. Gradient echo with a long TE is T2*/susceptibility weighted; T1 gradient echo (SPGR, MPRAGE,
# FLASH, TFE, BRAVO) has TE below ~6 ms even at 3 T.
PD_MIN_TR = 1500.0
PD_MAX_TE = 45.0
T2STAR_MIN_TE = 12.0


def _timing_reason(meta: SeriesMeta, scanning: set[str]) -> str | None:
    te, tr = meta.echo_time, meta.repetition_time
    inverted = "IR" in scanning or (meta.inversion_time or 0.0) > 0.0
    if te is None or inverted:
        return None
    if "SE" in scanning and tr is not None and tr >= PD_MIN_TR and te <= PD_MAX_TE:
        return f"proton-density series (spin echo, TR {tr:g} ms, TE {te:g} ms)"
    if "GR" in scanning and "SE" not in scanning and te >= T2STAR_MIN_TE:
        return f"T2*/susceptibility-weighted gradient echo (TE {te:g} ms)"
    return None


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
    return _timing_reason(meta, scanning)
