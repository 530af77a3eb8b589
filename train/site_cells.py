"""A site's verified cells, read and seen as the bundle's int8 model sees them: features per view.

Accepted: the folder `hematovision-edge export-cells` writes (class sub-folders and cells.csv, whose
pixel sizes are used), or any folder of class sub-folders of single-cell images (each located and
its scale measured from its red cells, as `hematovision-edge classify` does). No TensorFlow here.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hematovision.classes import UNIDENTIFIED, parse_label
from hematovision.errors import DataError, ImageUnreadable
from hematovision.pixels import IMAGE_SUFFIXES, read_rgb
from hematovision.stain import standardise_crops

logger = logging.getLogger(__name__)

CELLS_CSV = "cells.csv"  # written by `hematovision-edge export-cells`
# Labels a person may give that are no class to learn: left out, and counted.
NOT_LEARNED = (UNIDENTIFIED, "not_a_white_cell")


@dataclass(frozen=True)
class SiteCell:
    path: Path
    label: str
    um_per_pixel: float | None  # None: measured from the image's red cells
    centre: tuple[float, float] | None = None  # (x, y) px in the image, as export-cells writes; None: located


@dataclass(frozen=True)
class SiteFeatures:
    """The int8 model's pooled features of each located cell under `views` rotations and flips
    (view 0: the cell as cut), with the cells that could not be used and why."""

    features: np.ndarray  # (N, V, F)
    labels: np.ndarray  # (N,) str
    paths: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...] = ()

    def __len__(self) -> int:
        return len(self.labels)

    def counts(self) -> dict[str, int]:
        return {str(c): int(np.sum(self.labels == c)) for c in sorted(set(self.labels))}


def read_verified(root: Path) -> tuple[list[SiteCell], list[tuple[str, str]]]:
    """The cells of one folder, and the files left out with the reason.

    Raises DataError naming the folder when it does not exist or holds no class sub-folder."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder; give a folder of verified cells (hematovision-edge export-cells "
                        "--out DIR) or of class sub-folders of single-cell images")
    table = root / CELLS_CSV
    return _from_csv(root, table) if table.is_file() else _from_folders(root)


def _from_csv(root: Path, table: Path) -> tuple[list[SiteCell], list[tuple[str, str]]]:
    cells, left = [], []
    with open(table, newline="", encoding="utf-8") as handle:
        for line, row in enumerate(csv.DictReader(handle), start=2):
            where = f"{table}:{line}"
            if not row.get("path") or not row.get("label"):
                raise DataError(f"{where}: needs path and label columns; write the folder with export-cells")
            if row["label"] in NOT_LEARNED:
                left.append((str(root / row["path"]), f"labelled {row['label']}: not a class to learn"))
                continue
            um = row.get("um_per_pixel") or None
            centre = (float(row["x_px"]), float(row["y_px"])) if row.get("x_px") and row.get("y_px") and um else None
            cells.append(SiteCell(root / row["path"], parse_label(row["label"], where), float(um) if um else None,
                                  centre))
    return cells, left


def _from_folders(root: Path) -> tuple[list[SiteCell], list[tuple[str, str]]]:
    subs = sorted(p for p in root.iterdir() if p.is_dir())
    cells, left = [], []
    for sub in subs:
        if sub.name in NOT_LEARNED:
            left.extend((str(p), f"labelled {sub.name}: not a class to learn") for p in sorted(sub.iterdir()))
            continue
        label = parse_label(sub.name, str(sub))
        cells.extend(SiteCell(p, label, None) for p in sorted(sub.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES)
    if not subs:
        raise DataError(f"{root}: holds no class sub-folder (neutrophil/, lymphocyte/, ...)")
    return cells, left


def dihedral_views(crop: np.ndarray, views: int) -> np.ndarray:
    """The first `views` (1-8) of the crop's four rotations, then their mirror images."""
    turns = [np.rot90(crop, k) for k in range(4)]
    return np.stack((turns + [np.fliplr(t) for t in turns])[:views])


def view_features(bundle, crop: np.ndarray, views: int) -> np.ndarray:
    """(V, F) pooled features of one raw crop under `views` views, standardised as the device does."""
    return bundle.model.run(standardise_crops(dihedral_views(crop, views), bundle.colour))[1]


def site_features(bundle, cells: list[SiteCell], views: int = 8) -> SiteFeatures:
    """Each cell cut as the device cuts it (at the centre and pixel size export-cells recorded, or
    located as `classify` locates it), through the bundle's colour standard and int8 model under
    `views` views. Unreadable images and images with no white cell at the centre are skipped and listed."""
    from hematovision.edge.vision.classify import cut_cells
    from hematovision.edge.vision.locate import locate_cell

    features, labels, paths, skipped = [], [], [], []
    for cell in cells:
        try:
            image = read_rgb(cell.path)
            if cell.centre is None:
                located = locate_cell(image, cell.um_per_pixel, name=str(cell.path))
                centre, um = located.detection.center, located.um_per_pixel
            else:
                centre, um = cell.centre, cell.um_per_pixel
        except (ImageUnreadable, DataError) as err:
            skipped.append((str(cell.path), str(err)))
            continue
        crop = cut_cells(image, [centre], um, bundle)[0]
        features.append(view_features(bundle, crop, views))
        labels.append(cell.label)
        paths.append(str(cell.path))
    n_features = bundle.model.n_features
    stacked = np.stack(features) if features else np.zeros((0, views, n_features), np.float32)
    return SiteFeatures(stacked.astype(np.float32), np.array(labels, str), tuple(paths), tuple(skipped))


def cells_digest(cells: list[SiteCell]) -> str:
    """sha256 over every cell's label and file content, in path order: names the site cells a bundle used."""
    h = hashlib.sha256()
    for cell in sorted(cells, key=lambda c: str(c.path)):
        h.update(f"{cell.path.name}\t{cell.label}\t".encode())
        try:
            h.update(hashlib.sha256(cell.path.read_bytes()).digest())
        except OSError:
            h.update(b"unreadable")
    return h.hexdigest()
