"""The daemon's real decode path (dicom/pixels.py) feeds the model the same tensor as the training PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support.dicom_files import write_mr_slice
from triaged.dicom.pixels import decode_series


@pytest.mark.parametrize(
    ("bits", "scale", "slope", "intercept", "photometric"),
    [
        (12, 16, 1.0, 0.0, "MONOCHROME2"),
        (12, 8, 2.0, -100.0, "MONOCHROME2"),
        (16, 100, 0.5, -10.0, "MONOCHROME1"),
    ],
)
def test_png_and_decoded_dicom_give_the_same_tensor(  # noqa: PLR0917 - pytest parameters
    tmp_path: Path, bits: int, scale: int, slope: float, intercept: float, photometric: str
) -> None:
    from triaged.ml.transforms import PreprocessingConfig, build_preprocess, preprocess_slice
    from triaged.training.dataset import load_image

    yy, xx = np.mgrid[:70, :90]
    png = ((np.sin(yy / 7.0) * np.cos(xx / 5.0) + 1) * 120 + (xx % 13)).astype(np.uint8)
    Image.fromarray(png).save(tmp_path / "slice.png")
    values = png.astype(np.float64) * scale
    if photometric == "MONOCHROME1":
        values = values.max() - values
    stored = np.round((values - intercept) / slope)
    write_mr_slice(tmp_path / "slice.dcm", stored, bits=bits, slope=slope, intercept=intercept, photometric=photometric)
    [decoded] = decode_series([tmp_path / "slice.dcm"]).slices
    preprocess = build_preprocess(PreprocessingConfig(input_size=64))
    from_png = preprocess_slice(preprocess, load_image(tmp_path / "slice.png"))
    from_dicom = preprocess_slice(preprocess, decoded.pixels)
    np.testing.assert_allclose(from_png.numpy(), from_dicom.numpy(), atol=1e-5)
