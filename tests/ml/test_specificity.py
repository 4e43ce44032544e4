"""Tumour-free runs of tcga_lgg volumes, the series-level specificity probe's input."""

from __future__ import annotations

from triaged.training.data import Sample
from triaged.training.specificity import longest_tumour_free_run, tumour_free_series


def _slice(patient: str, number: int, label: str, *, excluded: bool = False, split: str = "test") -> Sample:
    path = f"tcga_lgg/{patient}/flair/{number:03d}.jpg"
    return Sample(path, "tcga_lgg", label, split, patient, excluded, "next_to_lesion" if excluded else "", False, False)


def test_the_longest_run_skips_lesion_and_excluded_slices() -> None:
    labels = ["notumor"] * 3 + ["glioma"] + ["notumor"] * 5 + ["x"] + ["notumor"] * 4
    samples = [
        _slice("TCGA_HT_0001", i + 1, "notumor" if label == "x" else label, excluded=label == "x")
        for i, label in enumerate(labels)
    ]
    assert longest_tumour_free_run(samples) == (4, 5)
    assert longest_tumour_free_run([_slice("TCGA_HT_0001", 1, "glioma")]) == (0, 0)


def test_runs_shorter_than_a_readable_series_are_left_out() -> None:
    long_run = [_slice("TCGA_HT_0001", i + 1, "notumor") for i in range(9)] + [_slice("TCGA_HT_0001", 10, "glioma")]
    short_run = [_slice("TCGA_HT_0002", i + 1, "notumor") for i in range(3)] + [_slice("TCGA_HT_0002", 4, "glioma")]
    [run] = tumour_free_series(long_run + short_run, "test", min_slices=8)
    assert run.patient == "TCGA_HT_0001" and len(run.samples) == 9
    assert all(s.label == "notumor" for s in run.samples)
