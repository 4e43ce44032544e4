"""Training-time random augmentation (MONAI), applied to already preprocessed (1, S, S) tensors in [0, 1].

Strong intensity augmentation (gamma, bias field, histogram shift, contrast, blur, resolution loss, noise) is
there because the training JPEGs were min-max scaled 8-bit exports while the daemon sees raw scanner
intensities from many vendors; geometric augmentation covers crops, zoom and head position.
"""

from __future__ import annotations

import math

from monai.transforms import (
    Compose,
    RandAdjustContrast,
    RandAffine,
    RandBiasField,
    RandFlip,
    RandGaussianNoise,
    RandGaussianSmooth,
    RandHistogramShift,
    RandScaleIntensity,
    RandSimulateLowResolution,
)


def build_train_augment(input_size: int, *, seed: int = 0) -> Compose:
    """Return the random augmentation ``Compose`` for training (seeded via ``set_random_state``)."""
    shift = input_size // 12
    aug = Compose(
        [
            RandAffine(
                prob=0.8,
                rotate_range=(math.pi / 12,),
                scale_range=(0.15, 0.15),
                translate_range=(shift, shift),
                mode="bilinear",
                padding_mode="zeros",
            ),
            RandFlip(prob=0.5, spatial_axis=1),
            RandSimulateLowResolution(prob=0.15, zoom_range=(0.5, 0.9)),
            RandGaussianSmooth(prob=0.15, sigma_x=(0.25, 1.0), sigma_y=(0.25, 1.0)),
            RandBiasField(prob=0.3, degree=3, coeff_range=(0.0, 0.25)),
            RandAdjustContrast(prob=0.4, gamma=(0.6, 1.6)),
            RandHistogramShift(prob=0.2, num_control_points=(5, 10)),
            RandScaleIntensity(prob=0.3, factors=0.2),
            RandGaussianNoise(prob=0.25, mean=0.0, std=0.03),
        ]
    )
    aug.set_random_state(seed=seed)
    return aug
