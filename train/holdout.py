"""Held-out test sets named in committed files, so the test split of a run is reproducible and auditable."""

from __future__ import annotations

import csv
import logging
from collections import defaultdict
from pathlib import Path

import numpy as np

from hematovision.errors import DataError

from .datasets import Sample
from .kaggle_origins import held_out_groups

logger = logging.getLogger(__name__)


def read_held_out(paths) -> set[str]:
    """The groups named by test-set files: a `group` column names sample groups directly (e.g.
    train/pbc_test_cells.csv); a `bccd_field` column names BCCD fields, whose same-cell partners
    follow (e.g. train/kaggle_test_origins.csv).

    Raises DataError naming the file when it is missing, has neither column, or names nothing.
    """
    groups: set[str] = set()
    for path in map(Path, paths):
        columns = _columns(path)
        if "group" in columns:
            named = _group_column(path)
            if not named:
                raise DataError(f"{path}: the group column names no group; nothing to hold out")
            logger.info("%s: %d groups held out as the test split", path.name, len(named))
            groups |= named
        else:
            groups |= held_out_groups(path)
    return groups


def _columns(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"{path}: no such file; give a CSV with a group or bccd_field column")
    with path.open(newline="") as handle:
        return next(csv.reader(handle), [])


def _group_column(path: Path) -> set[str]:
    with path.open(newline="") as handle:
        return {r["group"].strip() for r in csv.DictReader(handle) if r["group"].strip()}


def draw_held_out(samples: list[Sample], fraction: float, seed: int) -> list[tuple[str, str]]:
    """(group, label) of a seeded, class-stratified share of the groups, sorted.

    Raises DataError for a fraction outside (0, 1).
    """
    if not 0 < fraction < 1:
        raise DataError(f"hold-out fraction {fraction}: give a number between 0 and 1")
    by_class: dict[str, set[str]] = defaultdict(set)
    for s in samples:
        by_class[s.label].add(s.group)
    rng = np.random.default_rng(seed)
    chosen = []
    for label in sorted(by_class):
        groups = sorted(by_class[label])
        picked = rng.choice(len(groups), size=max(1, round(fraction * len(groups))), replace=False)
        chosen += [(groups[i], label) for i in sorted(picked)]
    return sorted(chosen)


def write_held_out(rows: list[tuple[str, str]], path: Path) -> None:
    """Write a test-set file (group, label) that `read_held_out` reads."""
    with Path(path).open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("group", "label"))
        writer.writerows(rows)
