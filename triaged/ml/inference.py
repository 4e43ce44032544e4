"""Inference: batched calibrated slice probabilities, assessability, series aggregation and Grad-CAM.

:class:`Predictor` keeps torch inside; :class:`Triage` is the facade the pipeline uses (see :mod:`triaged.ml.api`).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import structlog
import torch
from torch import nn

from triaged.errors import ModelError
from triaged.ml.aggregate import (
    aggregate_series,
    brain_measures,
    coarse_matrix_reason,
    in_brain_mask,
    relative_signal,
)
from triaged.ml.backends import Forward, build_forward, check_against_torch, resolve_backend
from triaged.ml.cam import CamConfig, cam_to_slice, compute_cams
from triaged.ml.device import Placement, choose_placement, faster_precision, time_cpu_precisions, torch_threads
from triaged.ml.extent import below_brain, slice_heights_mm
from triaged.ml.gate import gate_reason
from triaged.ml.networks import cam_target_layer
from triaged.ml.ood import OOD, FeatureTap, ood_layers
from triaged.ml.reformat import axial_reformat
from triaged.ml.registry import ModelSpec, load_model, load_ood
from triaged.ml.results import SeriesAssessment, SeriesMeta
from triaged.ml.transforms import build_preprocess, preprocess_stack

log = structlog.get_logger()

# A compiled backend whose probabilities differ more than this from torch fp32 on the load-time probe is broken.
BACKEND_CHECK_MAX_DP = 0.05


class Predictor:
    """A loaded network with its preprocessing, placement and temperature."""

    def __init__(
        self,
        spec: ModelSpec,
        model: nn.Module,
        placement: Placement,
        *,
        batch_size: int = 32,
        ood: OOD | None = None,
        forward: Forward | None = None,
    ) -> None:
        self.spec = spec
        self.forward = forward  # a compiled forward pass (OpenVINO, ONNX Runtime); None: torch
        self.ood = ood
        # Layers pooled on the same forward pass for the OOD score (a compiled forward was exported with them).
        self.ood_layers = ood_layers(ood)
        self.cam_config = CamConfig.from_dict(spec.extra.get("cam", {}), cam_target_layer(spec.arch))
        # Left-right flip averaging, when the model was evaluated and calibrated that way (model.json).
        self.flip_tta = bool(dict(spec.extra.get("inference", {})).get("flip_tta", False))
        self.placement = placement
        self.batch_size = batch_size
        self.model = model.to(placement.device).eval()
        self.model = self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.preprocess = build_preprocess(spec.preprocessing)

    @classmethod
    def from_dir(
        cls,
        model_dir: Path,
        *,
        device: str = "auto",
        precision: str = "auto",
        backend: str = "torch",
        cache_dir: Path | None = None,
        threads: int | None = None,
    ) -> Predictor:
        spec, model = load_model(model_dir)
        return cls.build(
            spec,
            model,
            device=device,
            precision=precision,
            ood=load_ood(model_dir, spec),
            backend=backend,
            cache_dir=cache_dir,
            threads=threads,
        )

    @classmethod
    def build(
        cls,
        spec: ModelSpec,
        model: nn.Module,
        *,
        device: str,
        precision: str,
        ood: OOD | None = None,
        backend: str = "torch",
        cache_dir: Path | None = None,
        threads: int | None = None,
    ) -> Predictor:
        """A predictor whose ``auto`` precision on a bf16-capable CPU is settled by timing this model both ways.

        The daemon and ``triaged evaluate`` both come through here, so "auto" means the same in each. With a
        compiled ``backend`` (see :mod:`triaged.ml.backends`) the forward passes run there and torch keeps
        Grad-CAM; under ``auto`` a backend that cannot be built or fails its load-time check falls back to torch.
        """
        placement = choose_placement(device, precision)
        chosen = resolve_backend(backend, placement.device)
        forward = None
        if chosen != "torch":
            forward = _compiled_forward(
                chosen,
                backend,
                model=model,
                spec=spec,
                precision=precision,
                cache_dir=cache_dir,
                threads=threads,
                layers=ood_layers(ood),
            )
        predictor = cls(spec, model, placement, ood=ood, forward=forward)
        if forward is None and precision == "auto" and placement == Placement("cpu", "bf16"):
            size = spec.preprocessing.input_size
            timings = time_cpu_precisions(predictor.model, (8, 1, size, size))
            predictor.placement = Placement("cpu", faster_precision(timings))
            log.info(
                "cpu_precision_measured",
                chosen=predictor.placement.precision,
                fp32_ms=round(timings["fp32"] * 1000, 1),
                bf16_ms=round(timings["bf16"] * 1000, 1),
            )
        return predictor

    @property
    def backend(self) -> str:
        return "torch" if self.forward is None else self.forward.name

    @property
    def forward_precision(self) -> str:
        """The precision of the forward passes (the backend's own when compiled)."""
        return self.placement.precision if self.forward is None else self.forward.precision

    def preprocess_slices(self, slices: Sequence[np.ndarray]) -> torch.Tensor:
        """Stack preprocessed slices into an (N, 1, S, S) float32 CPU tensor (one pass over the whole stack)."""
        return preprocess_stack(self.spec.preprocessing, [np.asarray(s) for s in slices])

    def logits(self, x: torch.Tensor) -> np.ndarray:
        """Raw logits (N, C) as float32."""
        if self.forward is not None:
            return self.forward(x.numpy())[0]
        return self._torch_logits(x)

    @torch.inference_mode()
    def _torch_logits(self, x: torch.Tensor) -> np.ndarray:
        """Raw logits (N, C) as float32, computed in batches under the chosen precision."""
        out = []
        for start in range(0, x.shape[0], self.batch_size):
            batch = x[start : start + self.batch_size].to(self.placement.device)
            batch = batch.contiguous(memory_format=torch.channels_last)
            with self.placement.autocast():
                out.append(self.model(batch).float().cpu())
        if not out:
            return np.zeros((0, len(self.spec.classes)), dtype=np.float32)
        return torch.cat(out).numpy().astype(np.float32)

    def logits_and_features(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Logits (N, C) and OOD features (N, D: pooled ``ood_layers``, then the penultimate), both float32.

        With ``flip_tta`` the logits are the mean over the slice and its left-right mirror (brains are roughly
        symmetric and tumours occur on either side); the features, used for the OOD score, are the slice's own.
        """
        if self.forward is not None:
            if not self.flip_tta:
                return self.forward(x.numpy())
            # One call for the slices and their mirrors: one batch, one set of kernel launches.
            n = x.shape[0]
            both, features = self.forward(torch.cat([x, torch.flip(x, dims=[-1])]).numpy())
            return (both[:n] + both[n:]) / 2.0, features[:n]
        logits, features = self._one_pass(x)
        if self.flip_tta:
            logits = (logits + self._torch_logits(torch.flip(x, dims=[-1]))) / 2.0
        return logits, features

    def features(self, x: torch.Tensor) -> np.ndarray:
        """OOD features (N, D) float32 only (one pass, no TTA: the OOD model needs nothing else)."""
        return self._one_pass(x)[1]

    def _one_pass(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        if self.forward is not None:
            return self.forward(x.numpy())
        with FeatureTap(self.model, self.ood_layers) as tap:
            logits = self._torch_logits(x)
        return logits, tap.array()

    def calibrated(self, logits: np.ndarray) -> np.ndarray:
        """Temperature-scaled softmax probabilities (N, C) float32."""
        return softmax(logits / self.spec.temperature)

    def cams(self, x: torch.Tensor, class_index: int) -> np.ndarray:
        """Grad-CAM maps (N, S, S) in [0, 1] with the layer, method and density chosen on validation."""
        c = self.cam_config
        return compute_cams(self.model, x, class_index, c.target_layer, method=c.method, atrous=c.atrous)


def _compiled_forward(
    chosen: str,
    asked: str,
    *,
    model: nn.Module,
    spec: ModelSpec,
    precision: str,
    cache_dir: Path | None,
    threads: int | None,
    layers: tuple[str, ...] = (),
) -> Forward | None:
    """Build and check ``chosen``; under ``auto`` (``asked``) any failure means torch, logged, never a crash."""
    try:
        if cache_dir is None:
            raise ModelError(f"backend {chosen!r} needs a cache directory for its ONNX export")
        forward = build_forward(
            chosen, model, spec, precision=precision, cache_dir=cache_dir, threads=threads, layers=layers
        )
        max_dp = check_against_torch(forward, model, spec)
        if not max_dp <= BACKEND_CHECK_MAX_DP:
            raise ModelError(f"backend {chosen!r} disagrees with torch (max |Δp| {max_dp:.3g} on the probe)")
    except (ModelError, OSError, RuntimeError) as exc:
        if asked != "auto":
            raise ModelError(f"cannot use backend {chosen!r}: {exc}") from exc
        log.warning("backend_unavailable", backend=chosen, error=str(exc), fallback="torch")
        return None
    log.info("backend_ready", backend=forward.name, precision=forward.precision, probe_max_dp=round(max_dp, 5))
    return forward


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    result: np.ndarray = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
    return result


def energy_score(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Free energy ``-T·logsumexp(logits/T)``: higher means less like the training data (Liu et al. 2020)."""
    z = logits / temperature
    m = z.max(axis=1, keepdims=True)
    result: np.ndarray = (-temperature * (m[:, 0] + np.log(np.exp(z - m).sum(axis=1)))).astype(np.float32)
    return result


class Triage:
    """Assess series with one shipped model; safe to call from one worker thread at a time (calls serialise)."""

    def __init__(
        self,
        model_dir: Path,
        *,
        device: str = "auto",
        precision: str = "auto",
        threads: int | None = None,
        backend: str = "torch",
        cache_dir: Path | None = None,
    ) -> None:
        self._predictor = Predictor.from_dir(
            Path(model_dir), device=device, precision=precision, backend=backend, cache_dir=cache_dir, threads=threads
        )
        self._threads = threads
        self._lock = threading.Lock()
        spec = self._predictor.spec
        log.info(
            "model_loaded",
            model_name=spec.name,
            model_version=spec.version,
            arch=spec.arch,
            device=self._predictor.placement.device,
            precision=self._predictor.placement.precision,
            backend=self._predictor.backend,
            backend_precision=self._predictor.forward_precision,
            threads=threads or torch.get_num_threads(),
            provisional=spec.provisional,
        )

    @property
    def model_name(self) -> str:
        return self._predictor.spec.name

    @property
    def model_version(self) -> str:
        return self._predictor.spec.version

    @property
    def weights_sha256(self) -> str:
        return self._predictor.spec.weights_sha256

    @property
    def classes(self) -> tuple[str, ...]:
        return self._predictor.spec.classes

    @property
    def threshold(self) -> float:
        return float(self._predictor.spec.thresholds.get("urgency", 0.5))

    def assess(self, slices: Sequence[np.ndarray], meta: SeriesMeta, *, cam_top_k: int = 3) -> SeriesAssessment:
        """Gate, score and aggregate one series (slices in patient order, any size, modality LUT applied)."""
        for i, s in enumerate(slices):
            arr = np.asarray(s)
            if arr.ndim != 2:
                raise ValueError(f"slice {i} has shape {arr.shape}; expected 2-D")
            if not np.isfinite(arr).all():
                raise ValueError(f"slice {i} contains NaN or infinite pixel values")
        reason = gate_reason(meta) or (None if slices else "series has no slices")
        if reason is not None:
            return self._not_assessable(reason, len(slices), {})
        # Only a model that says it was validated on axial slices of 3-D volumes gets them reformatted: 1.2.0,
        # which never saw a normal axial clinical T1, flags the MPRAGE's axial reformat (0.998).
        plane = self._predictor.spec.extra.get("scoring_plane")
        reformat = axial_reformat(slices, meta.geometry) if plane == "axial" else None
        with self._lock, torch_threads(self._threads):
            if reformat is None:
                heights = slice_heights_mm([np.shape(s) for s in slices], meta.geometry)
                return self._assess(slices, cam_top_k, heights)
            result = self._assess(reformat.slices, cam_top_k, reformat.heights_mm)
        log.info("series_reformatted", reformat=reformat.description, slices=len(reformat.slices))
        return dataclasses.replace(
            result,
            reformat=reformat.description,
            key_images={i: np.asarray(reformat.slices[i]) for i in result.key_slice_indices},
        )

    def refused(self, reason: str, n_slices: int) -> SeriesAssessment:
        """The ``not_assessable`` result for a series refused before its pixels were read (e.g. undecodable)."""
        return self._not_assessable(reason, n_slices, {})

    def _assess(self, slices: Sequence[np.ndarray], cam_top_k: int, heights_mm: np.ndarray | None) -> SeriesAssessment:
        p = self._predictor
        spec = p.spec
        coarse = coarse_matrix_reason(slices, spec.aggregation)
        if coarse is not None:
            return self._not_assessable(coarse, len(slices), {})
        timings: dict[str, float] = {}
        t = time.perf_counter()
        x = p.preprocess_slices(slices)
        in_brain = in_brain_mask(brain_measures(x.numpy(), relative_signal(slices)), spec.aggregation)
        neck = below_brain(in_brain, heights_mm, spec.aggregation.get("max_brain_height_mm"))
        in_brain &= ~neck
        timings["preprocess"] = time.perf_counter() - t
        t = time.perf_counter()
        logits, features = p.logits_and_features(x)
        probs = p.calibrated(logits)
        timings["inference"] = time.perf_counter() - t
        if not in_brain.any():
            return self._not_assessable(
                "no slice contains enough brain", len(slices), timings, probs=probs, in_brain=in_brain
            )
        ood_score, ood_threshold, kind = self._ood(logits[in_brain], features[in_brain])
        if ood_threshold is not None and ood_score > ood_threshold:
            reason = f"out of distribution ({kind} {ood_score:.2f} > {ood_threshold:.2f})"
            return self._not_assessable(
                reason, len(slices), timings, probs=probs, in_brain=in_brain, ood_score=ood_score
            )
        score = aggregate_series(probs, in_brain, spec.classes, spec.aggregation)
        t = time.perf_counter()
        cams: dict[int, np.ndarray] = {}
        chosen = list(score.key_slice_indices[: max(0, cam_top_k)])
        if chosen:
            maps = p.cams(x[chosen], score.label_index)
            cams = {i: cam_to_slice(m, np.asarray(slices[i]).shape) for i, m in zip(chosen, maps, strict=True)}
        timings["cam"] = time.perf_counter() - t
        urgent = score.urgency >= self.threshold
        result = SeriesAssessment(
            assessable=True,
            reason=None,
            label=spec.classes[score.label_index],
            class_probabilities={c: float(v) for c, v in zip(spec.classes, score.class_probabilities, strict=True)},
            urgency=score.urgency,
            threshold=self.threshold,
            urgent=urgent,
            slice_probabilities=probs,
            slice_in_brain=in_brain,
            key_slice_indices=score.key_slice_indices[: max(int(spec.aggregation.get("top_k", 3)), cam_top_k)],
            cams=cams,
            ood_score=ood_score,
            timings=timings,
        )
        log.info(
            "series_assessed",
            label=result.label,
            urgency=round(score.urgency, 4),
            urgent=urgent,
            slices=len(slices),
            in_brain=int(in_brain.sum()),
            below_brain=int(neck.sum()),
            ood_score=round(ood_score, 3),
            **{f"{k}_s": round(v, 4) for k, v in timings.items()},
        )
        return result

    def _ood(self, logits: np.ndarray, features: np.ndarray) -> tuple[float, float | None, str]:
        """Series OOD score (median over in-brain slices) and its threshold; feature distance when fitted.

        The median, not the maximum: one odd slice (a vertex cut, a flow artefact) must not refuse a series."""
        p = self._predictor
        threshold = p.spec.ood.get("threshold", p.spec.ood.get("energy_threshold"))
        if p.ood is not None:
            score, kind = float(np.median(p.ood.score(features))), "feature distance"
        else:
            score, kind = float(np.median(energy_score(logits, float(p.spec.ood.get("temperature", 1.0))))), "energy"
        return score, None if threshold is None else float(threshold), kind

    def _not_assessable(
        self,
        reason: str,
        n_slices: int,
        timings: dict[str, float],
        *,
        probs: np.ndarray | None = None,
        in_brain: np.ndarray | None = None,
        ood_score: float | None = None,
    ) -> SeriesAssessment:
        n_classes = len(self.classes)
        log.info("series_not_assessable", reason=reason, slices=n_slices)
        return SeriesAssessment(
            assessable=False,
            reason=reason,
            label=None,
            class_probabilities={},
            urgency=None,
            threshold=self.threshold,
            urgent=False,
            slice_probabilities=probs if probs is not None else np.zeros((0, n_classes), dtype=np.float32),
            slice_in_brain=in_brain if in_brain is not None else np.zeros(n_slices, dtype=bool),
            key_slice_indices=(),
            cams={},
            ood_score=ood_score,
            timings=timings,
        )
