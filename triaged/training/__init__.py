"""Training and evaluation tooling: data splits, datasets, augmentation, training, evaluation, model card.

The daemon never imports this package; it may import :mod:`triaged.ml`, never the reverse.
"""
