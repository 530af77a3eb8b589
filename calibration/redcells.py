"""Pixel-size estimate from the red cells' median diameter, for when no stage micrometer is at hand."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

from hematovision.errors import CalibrationError

from .profile import RED_CELL_ESTIMATE, PixelSize

logger = logging.getLogger(__name__)

# edge/vision/segment.py has its own red-cell estimator, written at the same time; this one is kept
# small and separate for calibration until the two are reconciled into one.


@dataclass(frozen=True)
class RedCellSettings:
    """Physical assumptions of the estimate and the limits of what counts as a red cell."""

    rbc_diameter_um: float = 7.5     # median diameter of normal red cells in a dried, stained smear
    rbc_diameter_sd_um: float = 0.5  # spread of that median between people (the estimate's main error)
    min_cells: int = 10
    min_radius_px: float = 4.0
    rays: int = 48
    edge_foot: float = 0.3           # the edge ends where the outward rise falls to this of its steepest


DEFAULT_RED_CELLS = RedCellSettings()


def cell_mask(image: np.ndarray) -> np.ndarray:
    """Cells (darker than the background in green) as a bool mask, central pallor filled in."""
    green = cv2.GaussianBlur(image[:, :, 1], (0, 0), 2.0)
    _, mask = cv2.threshold(green, 0, 255, cv2.THRESH_BINARY_INV | cv2.THRESH_OTSU)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5)))
    holes = mask.copy()
    flood = np.zeros((mask.shape[0] + 2, mask.shape[1] + 2), np.uint8)
    for seed in _background_seeds(mask):
        cv2.floodFill(holes, flood, seed, 255)
    return (mask > 0) | (holes == 0)


def _background_seeds(mask: np.ndarray) -> list[tuple[int, int]]:
    """Border pixels outside cells, from which the background is flood-filled."""
    h, w = mask.shape
    border = [(x, 0) for x in range(0, w, 8)] + [(x, h - 1) for x in range(0, w, 8)]
    border += [(0, y) for y in range(0, h, 8)] + [(w - 1, y) for y in range(0, h, 8)]
    return [p for p in border if mask[p[1], p[0]] == 0]


def cell_centres(image: np.ndarray, settings: RedCellSettings = DEFAULT_RED_CELLS) -> np.ndarray:
    """(x, y, inscribed radius) of each cell: the distance-transform peaks of the cell mask.

    Each peak is the centre of the largest disc inside a cell, so touching cells still give their
    own centre; cells within two radii of the image border are left out.
    """
    mask = cell_mask(image).astype(np.uint8)
    distance = cv2.distanceTransform(mask, cv2.DIST_L2, 5)
    size = int(2 * max(distance.max() * 0.8, settings.min_radius_px)) | 1
    peaks = (distance >= cv2.dilate(distance, np.ones((size, size), np.uint8))) & (distance >= settings.min_radius_px)
    ys, xs = np.nonzero(peaks)
    radii = distance[ys, xs]
    h, w = mask.shape
    inside = (xs > 2 * radii) & (ys > 2 * radii) & (xs < w - 1 - 2 * radii) & (ys < h - 1 - 2 * radii)
    return np.stack([xs[inside], ys[inside], radii[inside]], axis=1).astype(np.float32)


def outer_diameter(green: np.ndarray, x: float, y: float, radius: float, settings: RedCellSettings) -> float:
    """Diameter of the cell's outer edge, searched along rays from its centre.

    On each ray the steepest rise from cell to background is found, then the edge's foot beyond
    it (where the rise falls to settings.edge_foot of its steepest); the median over rays is kept.
    """
    angles = np.linspace(0, 2 * np.pi, settings.rays, endpoint=False)
    rho = np.arange(0.6 * radius, 2.0 * radius, 0.5, dtype=np.float32)
    xs = (x + np.outer(rho, np.cos(angles))).astype(np.float32)
    ys = (y + np.outer(rho, np.sin(angles))).astype(np.float32)
    rise = np.diff(cv2.remap(green, xs, ys, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT), axis=0)
    steepest = np.argmax(rise, axis=0)
    step = np.arange(rise.shape[0])[:, None]
    foot = (step > steepest) & (rise < settings.edge_foot * rise[steepest, np.arange(rise.shape[1])])
    edge = np.where(foot.any(axis=0), np.argmax(foot, axis=0), rise.shape[0] - 1)
    return 2.0 * float(np.median(rho[edge]))


def cell_diameters(image: np.ndarray, settings: RedCellSettings = DEFAULT_RED_CELLS) -> np.ndarray:
    """Outer diameters (pixels) of the cells of one RGB uint8 field."""
    green = cv2.GaussianBlur(image[:, :, 1].astype(np.float32), (0, 0), 1.5)
    centres = cell_centres(image, settings)
    return np.array([outer_diameter(green, x, y, r, settings) for x, y, r in centres], dtype=np.float64)


def pixel_size_from_red_cells(images: Sequence[np.ndarray], settings: RedCellSettings = DEFAULT_RED_CELLS) -> PixelSize:
    """ESTIMATE of micrometres per pixel: assumed red-cell diameter / median measured diameter.

    Labelled source "red-cell estimate": it assumes normal red cells (rbc_diameter_um; wrong for
    micro- or macrocytic blood) and its uncertainty is that assumption's spread; use a stage
    micrometer for a measurement. Cells are found as distance-transform peaks of an Otsu mask of
    the green channel; each diameter is the cell's outer edge along rays from its centre. Raises CalibrationError when too few cells are found.
    """
    diameters = np.concatenate([cell_diameters(im, settings) for im in images]) if images else np.zeros(0)
    if diameters.size < settings.min_cells:
        raise CalibrationError(
            f"only {diameters.size} red cells found (need {settings.min_cells}); use focused fields of a stained "
            "smear's monolayer where red cells lie side by side"
        )
    diameter = float(np.median(diameters))
    um = settings.rbc_diameter_um / diameter
    spread = settings.rbc_diameter_sd_um / settings.rbc_diameter_um
    logger.info("red cells: %d, median diameter %.1f px -> ESTIMATE %.4f um/px", diameters.size, diameter, um)
    return PixelSize(um_per_pixel=um, uncertainty=um * spread, source=RED_CELL_ESTIMATE)
