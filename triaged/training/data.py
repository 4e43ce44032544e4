"""Leak-free grouped, stratified train/validation/test split over Kaggle 4-class ∪ Cheng figshare.

Why grouped: the published Kaggle split leaks (byte copies, near-duplicates and re-crops across Training and
Testing, and 1705 Kaggle images are Cheng slices). Images are joined into groups by union-find over Kaggle
``dup_group``, Kaggle→Cheng ``cheng_match``, and blocks of consecutive Cheng indices (the figshare files are ordered
by patient, ~13 slices each, and carry no patient id, so blocks are a conservative patient proxy). Whole groups
are assigned to one side. Every group holding a Kaggle ``clean_test`` row goes to the test side, so the
``clean_test`` report is leak-free with respect to our training data as well.
"""

from __future__ import annotations

import csv
import hashlib
import io
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "val", "test")
CHENG_BLOCK = 12
MANIFEST_FIELDS = (
    "path",
    "source",
    "label",
    "split",
    "group",
    "excluded",
    "exclude_reason",
    "clean_test",
    "in_cheng",
)


@dataclass(frozen=True)
class Sample:
    """One image of the manifest; ``path`` is relative to the data root."""

    path: str
    source: str
    label: str
    split: str
    group: str
    excluded: bool
    exclude_reason: str
    clean_test: bool
    in_cheng: bool


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def build_samples(data_root: Path) -> list[Sample]:
    """Read both index.csv files and return every image with its group and exclusion flag (split unset)."""
    kaggle = _read_csv(data_root / "kaggle_4class" / "index.csv")
    cheng = _read_csv(data_root / "cheng_figshare" / "index.csv")
    uf = _UnionFind()
    cheng_label: dict[str, str] = {}
    for row in cheng:
        node = "cheng_figshare/" + row["file"]
        cheng_label[row["file"]] = row["label"]
        block = (int(row["cheng_index"]) - 1) // CHENG_BLOCK
        uf.union(node, f"chengblock:{row['label']}:{block}")
    for row in kaggle:
        node = "kaggle_4class/" + row["file"]
        uf.union(node, "kgroup:" + row["dup_group"])
        if row["cheng_match"]:
            uf.union(node, "cheng_figshare/" + row["cheng_match"])
    samples: list[Sample] = []
    for row in cheng:
        node = "cheng_figshare/" + row["file"]
        samples.append(Sample(node, "cheng", row["label"], "", uf.find(node), False, "", False, True))
    for row in kaggle:
        node = "kaggle_4class/" + row["file"]
        reason = ""
        if row["dup_group_label_conflict"] == "true":
            reason = "dup_group_label_conflict"
        elif row["cheng_match"] and cheng_label.get(row["cheng_match"], row["label"]) != row["label"]:
            reason = f"cheng_label_mismatch:{cheng_label[row['cheng_match']]}"
        samples.append(
            Sample(
                node,
                "kaggle",
                row["label"],
                "",
                uf.find(node),
                bool(reason),
                reason,
                row["clean_test"] == "true",
                row["in_cheng"] == "true",
            )
        )
    return samples


def assign_splits(
    samples: Sequence[Sample],
    *,
    seed: int = 20260,
    fractions: tuple[float, float, float] = (0.70, 0.15, 0.15),
) -> list[Sample]:
    """Assign whole groups to train/val/test, stratified by each group's majority label.

    Groups with a ``clean_test`` row are pinned to test first; the rest are placed largest first, each into the
    split with the largest remaining deficit for its label (deterministic for a given seed).
    """
    groups: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        groups[s.group].append(s)
    totals = Counter(s.label for s in samples)
    target = {(sp, lab): fr * n for lab, n in totals.items() for sp, fr in zip(SPLITS, fractions, strict=True)}
    have: Counter[tuple[str, str]] = Counter()
    chosen: dict[str, str] = {}
    order = sorted(groups)
    random.Random(seed).shuffle(order)
    pinned = [g for g in order if any(s.clean_test for s in groups[g])]
    rest = sorted((g for g in order if g not in set(pinned)), key=lambda g: -len(groups[g]))
    for g in pinned + rest:
        members = groups[g]
        label = Counter(s.label for s in members).most_common(1)[0][0]
        if g in pinned:
            split = "test"
        else:
            split = max(SPLITS, key=lambda sp: (target[(sp, label)] - have[(sp, label)]) / max(target[(sp, label)], 1))
        chosen[g] = split
        for s in members:
            have[(split, s.label)] += 1
    return [Sample(**{**s.__dict__, "split": chosen[s.group]}) for s in samples]


def manifest_csv(samples: Iterable[Sample]) -> bytes:
    """Serialise the manifest deterministically (sorted by path) so its sha256 identifies the data split."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(MANIFEST_FIELDS)
    for s in sorted(samples, key=lambda s: s.path):
        writer.writerow(
            [
                s.path,
                s.source,
                s.label,
                s.split,
                s.group,
                str(s.excluded).lower(),
                s.exclude_reason,
                str(s.clean_test).lower(),
                str(s.in_cheng).lower(),
            ]
        )
    return buf.getvalue().encode()


def write_manifest(samples: Iterable[Sample], path: Path) -> str:
    """Write the manifest CSV and return its sha256 (also written next to it as ``<name>.sha256``)."""
    data = manifest_csv(samples)
    digest = hashlib.sha256(data).hexdigest()
    path.write_bytes(data)
    path.with_name(path.name + ".sha256").write_text(f"{digest}  {path.name}\n")
    return digest


def read_manifest(path: Path) -> list[Sample]:
    """Read a manifest written by :func:`write_manifest`."""
    return [
        Sample(
            r["path"],
            r["source"],
            r["label"],
            r["split"],
            r["group"],
            r["excluded"] == "true",
            r["exclude_reason"],
            r["clean_test"] == "true",
            r["in_cheng"] == "true",
        )
        for r in _read_csv(path)
    ]


def training_samples(samples: Sequence[Sample], split: str) -> list[Sample]:
    """Samples used to fit or select the model: not excluded, and Kaggle copies of Cheng slices dropped.

    A Kaggle image matched to a Cheng slice is the same picture at lower fidelity; keeping both would only
    double-weight those slices. Evaluation sets keep every non-excluded row.
    """
    return [s for s in samples if s.split == split and not s.excluded and not (s.source == "kaggle" and s.in_cheng)]


def evaluation_samples(samples: Sequence[Sample], split: str, *, clean_test_only: bool = False) -> list[Sample]:
    """Non-excluded samples of ``split`` (optionally only Kaggle ``clean_test`` rows)."""
    out = [s for s in samples if s.split == split and not s.excluded]
    return [s for s in out if s.clean_test] if clean_test_only else out


def split_summary(samples: Sequence[Sample]) -> dict[str, dict[str, int]]:
    """Counts per split and label (excluded rows under ``excluded``), for logs and the model card."""
    out: dict[str, dict[str, int]] = defaultdict(dict)
    for (sp, lab), n in sorted(Counter(("excluded" if s.excluded else s.split, s.label) for s in samples).items()):
        out[sp][lab] = n
    return dict(out)
