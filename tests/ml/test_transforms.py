"""Preprocessing parity: a slice gives the same tensor from PNG (training) and from DICOM (daemon)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.pixels.processing import apply_modality_lut

from tests.support.dicom_files import write_mr_slice
from triaged.ml.transforms import PreprocessingConfig, build_preprocess, content_box, preprocess_slice
from triaged.training.dataset import load_image


def _png_pixels(shape: tuple[int, int] = (70, 90)) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    pixels: np.ndarray = ((np.sin(yy / 7.0) * np.cos(xx / 5.0) + 1) * 120 + (xx % 13)).astype(np.uint8)
    return pixels


def _daemon_pixels(path: Path) -> np.ndarray:
    """What the pipeline hands to ml: modality LUT applied, MONOCHROME1 inverted, float32."""
    ds = pydicom.dcmread(path)
    values = np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float32)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        values = values.max() - values
    return values


@pytest.mark.parametrize(
    ("bits", "scale", "slope", "intercept", "photometric"),
    [
        (12, 16, 1.0, 0.0, "MONOCHROME2"),
        (16, 200, 1.0, 0.0, "MONOCHROME2"),
        (12, 8, 2.0, -100.0, "MONOCHROME2"),
        (12, 16, 1.0, 0.0, "MONOCHROME1"),
        (16, 100, 0.5, -10.0, "MONOCHROME1"),
    ],
)
def test_png_and_dicom_give_the_same_tensor(  # noqa: PLR0917 (parametrised)
    tmp_path: Path, bits: int, scale: int, slope: float, intercept: float, photometric: str
) -> None:
    png = _png_pixels()
    Image.fromarray(png).save(tmp_path / "slice.png")
    values = png.astype(np.float64) * scale  # real-world values of the DICOM version
    if photometric == "MONOCHROME1":
        values = values.max() - values  # displayed inverted, so the stored ramp runs the other way
    stored = np.round((values - intercept) / slope)
    assert stored.min() >= 0 and stored.max() < 2**bits
    write_mr_slice(tmp_path / "slice.dcm", stored, bits=bits, slope=slope, intercept=intercept, photometric=photometric)
    preprocess = build_preprocess(PreprocessingConfig(input_size=64))
    from_png = preprocess_slice(preprocess, load_image(tmp_path / "slice.png"))
    from_dicom = preprocess_slice(preprocess, _daemon_pixels(tmp_path / "slice.dcm"))
    assert from_png.shape == (1, 64, 64)
    np.testing.assert_allclose(from_png.numpy(), from_dicom.numpy(), atol=1e-5)


def test_output_range_and_padding_geometry() -> None:
    preprocess = build_preprocess(PreprocessingConfig(input_size=64))
    pixels = np.random.default_rng(0).uniform(100, 4000, (50, 100)).astype(np.float32)
    out = preprocess_slice(preprocess, pixels).numpy()[0]
    assert out.min() >= 0.0 and out.max() <= 1.0
    top, left, h, w = content_box((50, 100), 64)
    assert (top, left, h, w) == (16, 0, 32, 64)
    assert np.all(out[:top] == 0) and np.all(out[top + h :] == 0)
    assert out[top : top + h].mean() > 0.2


def test_blank_slice_is_zero_without_warning() -> None:
    out = preprocess_slice(build_preprocess(PreprocessingConfig(input_size=32)), np.full((20, 20), 7.0, np.float32))
    assert float(out.abs().max()) == 0.0


def test_rejects_non_2d_input() -> None:
    with pytest.raises(ValueError, match="2-D"):
        preprocess_slice(build_preprocess(PreprocessingConfig(input_size=32)), np.zeros((2, 8, 8), np.float32))
