"""Single-cell images: find the white cell an image was taken of, and the scale to cut it at."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from hematovision.errors import CalibrationError, DataError

from .segment import DEFAULT_PARAMS, Detection, SegmentParams, estimate_um_per_pixel, segment

logger = logging.getLogger(__name__)

SCALE_GIVEN = "given"
SCALE_RED_CELLS = "red cells"
SCALE_ASSUMED = "assumed"
# With no red cells in view (a tight crop exported from another analyser), the image is taken to be
# of one white cell whose box is this wide: a typical white cell. Cell size then no longer tells
# classes apart, so the JSON output says the scale was assumed.
ASSUMED_CELL_UM = 12.0
# A crop with no red cells is first segmented as if the cell filled this share of its shorter side
# (a small guess would shrink the nucleus below the segmenter's least area).
_GUESS_FILL = 0.5


class NoCellFound(DataError):
    """The image holds no white cell near its centre."""


@dataclass(frozen=True)
class LocatedCell:
    """The white cell nearest an image's centre, and the pixel size to cut it at."""

    detection: Detection
    um_per_pixel: float
    scale_source: str  # SCALE_GIVEN, SCALE_RED_CELLS or SCALE_ASSUMED

    def to_json(self) -> dict:
        return {"bbox": list(self.detection.bbox), "um_per_pixel": round(self.um_per_pixel, 5),
                "scale_source": self.scale_source}


def locate_cell(image: np.ndarray, um_per_pixel: float | None = None,
                params: SegmentParams = DEFAULT_PARAMS, name: str = "image") -> LocatedCell:
    """The white cell an image was taken of: the detection nearest its centre whose box holds the centre.

    The scale is `um_per_pixel` when given, else measured from the red cells in view, else (too few
    red cells, or a measure at which no cell is found: a tight crop's cut red cells mislead it)
    assumed (`ASSUMED_CELL_UM`). Raises NoCellFound naming `name` when no white cell covers the
    centre, and DataError for an image the segmenter cannot read.
    """
    if um_per_pixel is not None:
        return LocatedCell(_centre_cell(image, um_per_pixel, params, name), um_per_pixel, SCALE_GIVEN)
    try:
        measured = estimate_um_per_pixel(image, params)
        return LocatedCell(_centre_cell(image, measured, params, name), measured, SCALE_RED_CELLS)
    except (CalibrationError, NoCellFound) as err:
        logger.debug("%s: %s; assuming the scale from the cell's size", name, err)
    return _assume_scale(image, params, name)


def _assume_scale(image: np.ndarray, params: SegmentParams, name: str) -> LocatedCell:
    guess = ASSUMED_CELL_UM / (_GUESS_FILL * min(image.shape[:2]))
    cell = _centre_cell(image, guess, params, name)
    x0, y0, x1, y1 = cell.bbox
    um = ASSUMED_CELL_UM / max(x1 - x0, y1 - y0)
    logger.debug("%s: no red cells to measure; scale assumed from the cell box (%.4f um/px)", name, um)
    return LocatedCell(cell, um, SCALE_ASSUMED)


def _centre_cell(image: np.ndarray, um_per_pixel: float, params: SegmentParams, name: str) -> Detection:
    found = segment(image, params, um_per_pixel)
    h, w = image.shape[:2]
    centre = ((w - 1) / 2.0, (h - 1) / 2.0)
    covering = [d for d in found.all_cells if _holds(d.bbox, centre)]
    if not covering:
        raise NoCellFound(f"{name}: no white cell found at the image centre ({len(found.all_cells)} elsewhere); "
                          "give an image centred on one white cell, or --um-per-pixel if its scale is known")
    return min(covering, key=lambda d: (d.touches_edge, np.hypot(d.center[0] - centre[0], d.center[1] - centre[1])))


def _holds(bbox, point) -> bool:
    return bbox[0] <= point[0] < bbox[2] and bbox[1] <= point[1] < bbox[3]
