"""Grouped, stratified, seeded splits, written as a manifest that refuses leaks on load."""

from __future__ import annotations

import csv
import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hematovision.errors import DataError

from .datasets import Sample

SPLITS = ("train", "val", "test")
MANIFEST_FIELDS = ("path", "label", "group", "split", "box", "um_per_pixel")


@dataclass(frozen=True)
class SplitPlan:
    """Fractions of groups held out for validation and test, and the seed."""

    val: float = 0.15
    test: float = 0.15
    seed: int = 0


def split_groups(samples: list[Sample], plan: SplitPlan) -> dict[str, str]:
    """Assign each group to train / val / test, stratified by the group's majority class.

    Every class with at least three groups gets at least one group in val and in test.
    """
    rng = np.random.default_rng(plan.seed)
    by_class: dict[str, list[str]] = defaultdict(list)
    for group, label in _group_labels(samples).items():
        by_class[label].append(group)
    assignment = {}
    for label in sorted(by_class):
        groups = sorted(by_class[label])
        rng.shuffle(groups)
        assignment.update(_deal(groups, plan))
    return assignment


def _deal(groups: list[str], plan: SplitPlan) -> dict[str, str]:
    n = len(groups)
    n_test = max(1, round(n * plan.test)) if n >= 3 and plan.test > 0 else 0
    n_val = max(1, round(n * plan.val)) if n >= 3 and plan.val > 0 else 0
    names = ["test"] * n_test + ["val"] * n_val + ["train"] * (n - n_test - n_val)
    return dict(zip(groups, names))


def _group_labels(samples: list[Sample]) -> dict[str, str]:
    counts: dict[str, Counter] = defaultdict(Counter)
    for s in samples:
        counts[s.group][s.label] += 1
    return {g: c.most_common(1)[0][0] for g, c in counts.items()}


def grouped_folds(samples: list[Sample], k: int, seed: int) -> list[str]:
    """Fold index per sample for grouped, stratified k-fold cross-validation."""
    from sklearn.model_selection import StratifiedGroupKFold

    labels = [s.label for s in samples]
    groups = [s.group for s in samples]
    folds = [""] * len(samples)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    for index, (_, test_idx) in enumerate(splitter.split(np.zeros(len(samples)), labels, groups)):
        for i in test_idx:
            folds[i] = str(index)
    return folds


@dataclass(frozen=True)
class ManifestRow:
    """One sample and the split it belongs to."""

    sample: Sample
    split: str


def make_manifest(samples: list[Sample], plan: SplitPlan, test_groups: set[str] | None = None) -> list[ManifestRow]:
    """Rows with their split; `test_groups` (a cross-validation fold) fixes the test split."""
    if test_groups is None:
        assignment = split_groups(samples, plan)
    else:
        rest = [s for s in samples if s.group not in test_groups]
        assignment = {**split_groups(rest, SplitPlan(plan.val / (1 - plan.test), 0.0, plan.seed)),
                      **{g: "test" for g in test_groups}}
    return [ManifestRow(s, assignment[s.group]) for s in samples]


def write_manifest(rows: list[ManifestRow], path: Path) -> str:
    """Write the manifest CSV; return its sha256 (the run's data fingerprint)."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(MANIFEST_FIELDS)
        for row in rows:
            writer.writerow(_manifest_cells(row))
    return manifest_hash(path)


def _manifest_cells(row: ManifestRow) -> list:
    s = row.sample
    box = " ".join(str(v) for v in s.box) if s.box else ""
    return [s.path, s.label, s.group, row.split, box, "" if s.um_per_pixel is None else repr(s.um_per_pixel)]


def manifest_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_manifest(path: Path) -> list[ManifestRow]:
    """Read a manifest. Raises DataError for a malformed line or a group found in two splits."""
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if tuple(reader.fieldnames or ()) != MANIFEST_FIELDS:
            raise DataError(f"{path}:1: manifest columns must be {','.join(MANIFEST_FIELDS)}")
        rows = [_parse_row(r, f"{path}:{reader.line_num}") for r in reader]
    check_no_leak(rows, str(path))
    return rows


def _parse_row(r: dict, where: str) -> ManifestRow:
    if r["split"] not in SPLITS:
        raise DataError(f"{where}: split {r['split']!r} is not one of {SPLITS}")
    try:
        box = tuple(int(v) for v in r["box"].split()) or None
        um = float(r["um_per_pixel"]) if r["um_per_pixel"] else None
    except ValueError as err:
        raise DataError(f"{where}: malformed box or pixel size ({err})") from err
    return ManifestRow(Sample(r["path"], r["label"], r["group"], box, um), r["split"])


def check_no_leak(rows: list[ManifestRow], where: str) -> None:
    """Raise DataError when any group has samples in more than one split."""
    seen: dict[str, str] = {}
    for row in rows:
        first = seen.setdefault(row.sample.group, row.split)
        if first != row.split:
            raise DataError(
                f"{where}: group {row.sample.group} is in both {first} and {row.split}; "
                "the same cell would be trained on and tested on. Re-split the data."
            )


def split_counts(rows: list[ManifestRow]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {s: {} for s in SPLITS}
    for row in rows:
        out[row.split][row.sample.label] = out[row.split].get(row.sample.label, 0) + 1
    return out


def samples_of(rows: list[ManifestRow], split: str) -> list[Sample]:
    return [r.sample for r in rows if r.split == split]
