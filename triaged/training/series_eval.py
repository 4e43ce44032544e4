"""Series-level evaluation on real volumes: tcga_lgg patients as DICOM MR series, through the daemon's own path.

Why: radiologists get series, not curated slices. Each test patient's slices of one contrast are written as an
axial MR series with the project's DICOM writer and realistic headers (FLAIR as inversion recovery, T1 as spin
echo; PS3.3 C.8.3.1), then decoded by :func:`triaged.dicom.pixels.decode_series`, gated by the metadata gate and
assessed by :class:`~triaged.ml.inference.Triage` exactly as ``triaged serve`` does: pixel decode → gate → MONAI
preprocessing → model → aggregation → threshold. The urgency threshold is then chosen on the validation series of
the site that never trained (:data:`triaged.training.lgg.UNSEEN_SITE`), not on slices of the training sources.
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from PIL import Image
from tqdm import tqdm

from triaged.dicom.pixels import DecodedSlice, decode_series, read_series_header
from triaged.dicom.synthetic import write_mr_series
from triaged.errors import PixelDecodeError
from triaged.ml.gate import gate_reason
from triaged.ml.inference import Triage
from triaged.ml.results import SeriesAssessment, SeriesMeta, SliceGeometry
from triaged.training.camscore import localisation_scores
from triaged.training.data import Sample
from triaged.training.dataset import load_image
from triaged.training.lgg import (
    is_lgg,
    lgg_contrast,
    lgg_mask_path,
    lgg_patient,
    lgg_site,
    lgg_slice_number,
)
from triaged.training.metrics import cluster_resamples, roc_auc
from triaged.training.mpr import estimated_slice_spacing_mm

log = structlog.get_logger()

# Headers of a typical clinical protocol per contrast (ms). FLAIR: turbo spin echo with inversion recovery.
CONTRAST_HEADERS: dict[str, dict[str, Any]] = {
    "flair": {
        "series_description": "AX T2 FLAIR",
        "scanning_sequence": ("SE", "IR"),
        "sequence_variant": ("SK", "SP", "MP"),
        "attributes": {"RepetitionTime": "9000", "EchoTime": "120", "InversionTime": "2500", "EchoTrainLength": "16"},
    },
    "t1_pre": {
        "series_description": "AX T1 SE",
        "scanning_sequence": ("SE",),
        "sequence_variant": ("SK", "SP"),
        "attributes": {"RepetitionTime": "550", "EchoTime": "12"},
    },
    "t1_post": {
        "series_description": "AX T1 SE POST GD",
        "scanning_sequence": ("SE",),
        "sequence_variant": ("SK", "SP"),
        "attributes": {"RepetitionTime": "550", "EchoTime": "12", "ContrastBolusAgent": "GADOLINIUM"},
    },
}
PIXEL_SPACING = 0.9  # mm; the source resampled to 256 px (README: raw series checked had 0.9 mm pixels)
BITS_STORED = 12


@dataclass(frozen=True)
class VolumeSeries:
    """One contrast of one tcga_lgg patient: manifest samples in slice order (inferior first)."""

    patient: str
    site: str
    contrast: str
    split: str
    samples: tuple[Sample, ...]


@dataclass
class SeriesOutcome:
    """What the daemon path made of one volume series, with the ground truth it is scored against."""

    patient: str
    site: str
    contrast: str
    assessable: bool
    reason: str | None
    urgency: float | None
    label: str | None
    key_slices: tuple[int, ...]  # slice numbers (1 = most inferior) of the key images, best first
    key_on_lesion: bool | None
    key_cam_hit: bool | None
    slice_tumour_prob: list[float] = field(default_factory=list)
    slice_truth: list[int] = field(default_factory=list)  # 1 tumour, 0 no tumour, -1 excluded from slice metrics

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("slice_tumour_prob", "slice_truth")}


def volume_series(samples: Sequence[Sample], split: str) -> list[VolumeSeries]:
    """Every (patient, contrast) of ``split`` whose contrast is real (FLAIR copies filed as T1 are left out)."""
    groups: dict[tuple[str, str], list[Sample]] = defaultdict(list)
    for s in samples:
        if is_lgg(s) and s.split == split:
            groups[(lgg_patient(s.path), lgg_contrast(s.path))].append(s)
    out = []
    for (patient, contrast), members in sorted(groups.items()):
        if any(m.exclude_reason == "duplicated_channel" for m in members):
            continue
        members.sort(key=lambda m: lgg_slice_number(m.path))
        out.append(VolumeSeries(patient, lgg_site(members[0].path), contrast, split, tuple(members)))
    return out


def load_volume(data_root: Path, series: VolumeSeries) -> list[np.ndarray]:
    """The 8-bit slices of a volume as float32 arrays (the values a viewer of the JPEGs sees)."""
    return [load_image(data_root / s.path) for s in series.samples]


def write_volume_series(data_root: Path, series: VolumeSeries, out_dir: Path) -> list[Path]:
    """Write ``series`` as a DICOM MR series (one file per slice, slice 1 at the bottom); return the paths.

    A modality LUT maps the 12-bit stored values back onto the source's grey levels, so decoding gives the JPEG
    pixels again (to within half a stored step). The source gives no slice spacing: one raw series had 5.5 mm,
    but stacks run from 20 to 88 slices over the same skull-base-to-vertex range, so one spacing for all would
    make the tallest stacks 480 mm high and let the below-the-brain rule drop real brain. Each series is
    spaced by :func:`triaged.training.mpr.estimated_slice_spacing_mm` of its own slices, the head-length estimate
    the reformats use.
    """
    slices = load_volume(data_root, series)
    low = min(float(s.min()) for s in slices)
    high = max(float(s.max()) for s in slices)
    slope = (high - low) / ((1 << BITS_STORED) - 1) if high > low else 1.0
    headers = CONTRAST_HEADERS[series.contrast]
    return write_mr_series(
        slices,
        out_dir,
        series_description=headers["series_description"],
        scanning_sequence=headers["scanning_sequence"],
        sequence_variant=headers["sequence_variant"],
        attributes=headers["attributes"],
        patient_name="ANON^LGG",
        patient_id="LGG",
        pixel_spacing=PIXEL_SPACING,
        slice_thickness=estimated_slice_spacing_mm(np.stack(slices)),
        bits_stored=BITS_STORED,
        rescale=(slope, low),
        seed=f"{series.patient}/{series.contrast}",
    )


def series_meta_of(header: Any, number_of_slices: int, geometry: SliceGeometry | None = None) -> SeriesMeta:
    """The pipeline's own mapping from DICOM header to gate metadata (imported late: pipeline pulls in the db)."""
    from triaged.pipeline import series_meta

    meta: SeriesMeta = series_meta(header, number_of_slices, geometry)
    return meta


def slice_geometry_of(slices: Sequence[DecodedSlice]) -> SliceGeometry | None:
    """The pipeline's own geometry of the decoded slices (imported late, as :func:`series_meta_of`)."""
    from triaged.pipeline import slice_geometry

    geometry: SliceGeometry | None = slice_geometry(slices)
    return geometry


def read_series(source: Path | Sequence[Path], *, strict: bool = False) -> tuple[list[np.ndarray], SeriesMeta]:
    """Decode a series the way the daemon does: its pixel decoder, slice order, gate metadata and geometry.

    ``source`` is a one-file-per-slice series directory, one (multi-frame) file or the series' files. A series the
    decoder refuses (a Siemens mosaic) comes back with no slices and its header's metadata, so the gate still
    judges it; ``strict`` keeps ``run_infer_job``'s rule instead: the decoder's error is raised unless the gate
    refuses the series from its header anyway.
    """
    if isinstance(source, Path):
        files = sorted(f for f in source.iterdir() if f.is_file()) if source.is_dir() else [source]
    else:
        files = list(source)
    try:
        decoded = decode_series(files)
    except PixelDecodeError:
        header, images = read_series_header(files)
        meta = series_meta_of(header, images)
        if strict and gate_reason(meta) is None:
            raise
        return [], meta
    meta = series_meta_of(decoded.header, len(decoded.slices), slice_geometry_of(decoded.slices))
    return [s.pixels for s in decoded.slices], meta


def assess_dicom_files(triage: Triage, paths: Sequence[Path], *, cam_top_k: int = 3) -> SeriesAssessment:
    """Assess one series from its DICOM files the way ``run_infer_job`` does, including its refusal of a series
    that does not decode but that the gate would refuse anyway (no slice decoded: the gate's reason, 0 slices)."""
    slices, meta = read_series(paths, strict=True)
    return triage.assess(slices, meta, cam_top_k=cam_top_k)


def _outcome(data_root: Path, series: VolumeSeries, assessment: SeriesAssessment, tumour_index: int) -> SeriesOutcome:
    numbers = [lgg_slice_number(s.path) for s in series.samples]
    truth = [(-1 if s.excluded else int(s.label != "notumor")) for s in series.samples]
    key = tuple(numbers[i] for i in assessment.key_slice_indices)
    outcome = SeriesOutcome(
        patient=series.patient,
        site=series.site,
        contrast=series.contrast,
        assessable=assessment.assessable,
        reason=assessment.reason,
        urgency=assessment.urgency,
        label=assessment.label,
        key_slices=key,
        key_on_lesion=None,
        key_cam_hit=None,
    )
    if not assessment.assessable or not assessment.key_slice_indices:
        return outcome
    probs = assessment.slice_probabilities
    outcome.slice_tumour_prob = [float(1.0 - p[tumour_index]) for p in probs]
    outcome.slice_truth = truth
    top = assessment.key_slice_indices[0]
    mask_file = lgg_mask_path(data_root, series.samples[top].path)
    with Image.open(mask_file) as m:
        mask = np.asarray(m.convert("L")) > 127
    outcome.key_on_lesion = bool(mask.any())
    if top in assessment.cams and mask.any():
        hits, _ = localisation_scores(assessment.cams[top][None], mask[None])
        outcome.key_cam_hit = bool(hits[0])
    return outcome


def evaluate_volumes(
    triage: Triage,
    data_root: Path,
    series: Sequence[VolumeSeries],
    *,
    work_dir: Path | None = None,
    progress: bool = True,
) -> list[SeriesOutcome]:
    """Write, decode and assess every volume series; DICOM files go to a temporary folder unless ``work_dir``."""
    outcomes = []
    no_tumour = list(triage.classes).index("notumor")
    with tempfile.TemporaryDirectory(prefix="triaged-volumes-") as tmp:
        root = work_dir or Path(tmp)
        for vs in tqdm(series, desc="series", disable=not progress, mininterval=10.0):
            paths = write_volume_series(data_root, vs, root / vs.split / vs.patient / vs.contrast)
            outcomes.append(_outcome(data_root, vs, assess_dicom_files(triage, paths), no_tumour))
    return outcomes


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion (sound at 0 % and 100 %, unlike the normal approximation)."""
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def _group_report(outcomes: Sequence[SeriesOutcome], threshold: float) -> dict[str, Any]:
    n = len(outcomes)
    urgent = sum(1 for o in outcomes if o.assessable and o.urgency is not None and o.urgency >= threshold)
    assessed = [o for o in outcomes if o.assessable]
    urgencies = np.array([o.urgency for o in assessed if o.urgency is not None], dtype=np.float64)
    probs = np.array([p for o in assessed for p, t in zip(o.slice_tumour_prob, o.slice_truth, strict=True) if t >= 0])
    truth = np.array([t for o in assessed for t in o.slice_truth if t >= 0])
    on_lesion = [o.key_on_lesion for o in assessed if o.key_on_lesion is not None]
    cam_hits = [o.key_cam_hit for o in assessed if o.key_cam_hit is not None]
    lo, hi = wilson_interval(urgent, n)
    return {
        "series": n,
        "urgent": urgent,
        "sensitivity": {"value": urgent / n if n else float("nan"), "ci95": [lo, hi]},
        "not_assessable": n - len(assessed),
        "not_assessable_reasons": sorted({str(o.reason) for o in outcomes if not o.assessable}),
        "urgency_quantiles": (
            {str(q): float(np.quantile(urgencies, q)) for q in (0.05, 0.25, 0.5, 0.75)} if urgencies.size else {}
        ),
        "slice_tumour_auc": roc_auc(truth, probs) if truth.size and 0 < truth.sum() < truth.size else float("nan"),
        "slices": int(truth.size),
        "key_image_on_lesion": float(np.mean(on_lesion)) if on_lesion else float("nan"),
        "key_image_pointing_game": float(np.mean(cam_hits)) if cam_hits else float("nan"),
    }


def series_report(outcomes: Sequence[SeriesOutcome], threshold: float, seen: frozenset[str]) -> dict[str, Any]:
    """Per contrast, per site (seen vs unseen) and overall: series sensitivity at ``threshold`` with a Wilson CI,
    not-assessable counts, urgency quantiles, slice-level tumour AUC against the masks, key images on the lesion.
    ``seen`` are the sites the model trained on (:func:`triaged.training.lgg.trained_sites`)."""
    by: dict[str, list[SeriesOutcome]] = defaultdict(list)
    for o in outcomes:
        by["all"].append(o)
        by[f"contrast:{o.contrast}"].append(o)
        by[f"site:{o.site}"].append(o)
        by["seen_sites" if o.site in seen else "unseen_sites"].append(o)
    return {
        "threshold": threshold,
        "groups": {name: _group_report(group, threshold) for name, group in sorted(by.items())},
        "series": [o.to_json() for o in outcomes],
    }


def choose_threshold(outcomes: Sequence[SeriesOutcome], target_sensitivity: float, *, ceiling: float = 0.99) -> float:
    """The highest urgency threshold at which at least ``target_sensitivity`` of ``outcomes`` (all tumour series)
    are urgent; not-assessable series count as missed, so a refusal can never buy sensitivity. Never above
    ``ceiling``: a threshold in the last percent of probability is a statement about rounding, not about patients.
    """
    urgencies = np.array([_counted_urgency(o.assessable, o.urgency) for o in outcomes])
    return _threshold_of(urgencies, target_sensitivity, ceiling)


def _counted_urgency(assessable: bool, urgency: float | None) -> float:
    """The urgency a series counts with when a threshold is chosen: a refused series is -1, below any threshold."""
    return urgency if assessable and urgency is not None else -1.0


def urgent_count(series: Sequence[dict[str, Any]], threshold: float) -> int:
    """How many report rows (``assessable``, ``urgency``) would be urgent at ``threshold``; a refused series never."""
    return sum(1 for s in series if _counted_urgency(s["assessable"], s["urgency"]) >= threshold)


def _threshold_of(urgencies: np.ndarray, target_sensitivity: float, ceiling: float) -> float:
    """:func:`choose_threshold` on urgencies (a refused series as -1)."""
    if urgencies.size == 0:
        raise ValueError("no series to choose a threshold on")
    ordered = np.sort(urgencies)
    allowed_misses = int(np.floor((1.0 - target_sensitivity) * ordered.size + 1e-9))
    value = float(ordered[min(allowed_misses, ordered.size - 1)])
    return float(min(max(value, 0.0), ceiling))


def threshold_interval(
    series: Sequence[dict[str, Any]],
    target_sensitivity: float,
    *,
    rounds: int = 2000,
    seed: int = 0,
    coverage: float = 0.9,
    ceiling: float = 0.99,
) -> dict[str, float]:
    """How far :func:`choose_threshold` moves when its series are drawn again: the rule re-run on ``rounds``
    resamples of the *patients* (with replacement, each with all its series, since one patient's contrasts are
    correlated) of ``series`` (report rows with ``patient``, ``assessable`` and ``urgency``). Returns the central
    ``coverage`` interval of the re-chosen thresholds. A threshold taken from the third-lowest of 45 urgencies
    moves a lot, and a site that adopts it should know by how much."""
    if not series:
        raise ValueError("no series to resample")
    urgencies = np.array([_counted_urgency(s["assessable"], s["urgency"]) for s in series])
    n_patients, resamples = cluster_resamples(np.array([s["patient"] for s in series]), rounds, seed)
    chosen = [_threshold_of(urgencies[pick], target_sensitivity, ceiling) for pick in resamples]
    tail = (1.0 - coverage) / 2
    lo, hi = np.quantile(chosen, [tail, 1.0 - tail])
    return {"lo": float(lo), "hi": float(hi), "coverage": coverage, "rounds": rounds, "patients": n_patients}


def balanced_threshold(tumour: np.ndarray, tumour_free: np.ndarray, min_sensitivity: float) -> float:
    """The threshold that maximises sensitivity + specificity over tumour series and tumour-free series
    (urgencies, a refused series as -1), among those keeping at least ``min_sensitivity`` of the tumour series
    urgent; the lowest such threshold on a tie. Unlike :func:`choose_threshold` it pays for false alarms, so it
    shows what counting the tumour-free series would do to the operating point."""
    if tumour.size == 0 or tumour_free.size == 0:
        raise ValueError("a balanced threshold needs tumour and tumour-free series")
    candidates = np.unique(np.concatenate([tumour, tumour_free]))
    candidates = candidates[candidates >= 0.0]  # a refused series (-1) is below every threshold, never one itself
    sensitivity = (tumour[None, :] >= candidates[:, None]).mean(axis=1)
    specificity = (tumour_free[None, :] < candidates[:, None]).mean(axis=1)
    allowed = sensitivity >= min_sensitivity - 1e-9
    if not allowed.any():
        return 0.0
    score = np.where(allowed, sensitivity + specificity, -np.inf)
    return float(candidates[int(np.argmax(score))])  # argmax takes the first, i.e. lowest, of equal scores


def balanced_threshold_interval(
    tumour_series: Sequence[dict[str, Any]],
    tumour_free_series: Sequence[dict[str, Any]],
    min_sensitivity: float,
    *,
    rounds: int = 2000,
    seed: int = 0,
    coverage: float = 0.9,
) -> dict[str, float]:
    """:func:`balanced_threshold` and its central ``coverage`` interval over patient resamples (each drawn patient
    with all its tumour and tumour-free series), as :func:`threshold_interval` does for the sensitivity rule."""
    rows = [*tumour_series, *tumour_free_series]
    if not tumour_series or not tumour_free_series:
        raise ValueError("a balanced threshold needs tumour and tumour-free series")
    urgencies = np.array([_counted_urgency(r["assessable"], r["urgency"]) for r in rows])
    is_tumour = np.arange(len(rows)) < len(tumour_series)
    n_patients, resamples = cluster_resamples(np.array([r["patient"] for r in rows]), rounds, seed)
    chosen = []
    for pick in resamples:
        tumour, free = urgencies[pick][is_tumour[pick]], urgencies[pick][~is_tumour[pick]]
        if tumour.size and free.size:  # a draw of patients may hold no series of one kind
            chosen.append(balanced_threshold(tumour, free, min_sensitivity))
    tail = (1.0 - coverage) / 2
    lo, hi = np.quantile(chosen, [tail, 1.0 - tail])
    value = balanced_threshold(urgencies[is_tumour], urgencies[~is_tumour], min_sensitivity)
    return {
        "threshold": value,
        "lo": float(lo),
        "hi": float(hi),
        "coverage": coverage,
        "rounds": len(chosen),
        "patients": n_patients,
    }


def _fmt(value: float, pattern: str) -> str:
    return "–" if np.isnan(value) else pattern.format(value)


def series_rows(report: dict[str, Any]) -> list[tuple[str, ...]]:
    """Rows of the model card's series table: group, series, urgent, sensitivity [CI], not assessable, AUC."""
    rows: list[tuple[str, ...]] = []
    for name, g in report["groups"].items():
        sens = g["sensitivity"]
        rows.append(
            (
                name,
                str(g["series"]),
                str(g["urgent"]),
                f"{sens['value'] * 100:.1f} % [{sens['ci95'][0] * 100:.1f}, {sens['ci95'][1] * 100:.1f}]",
                str(g["not_assessable"]),
                _fmt(g["slice_tumour_auc"], "{:.4f}"),
                _fmt(g["key_image_on_lesion"] * 100, "{:.0f} %"),
                _fmt(g["key_image_pointing_game"] * 100, "{:.0f} %"),
            )
        )
    return rows
