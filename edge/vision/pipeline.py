"""One microscope field through the stages: correct, segment, cut, classify."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from dataclasses import field as dataclass_field
from typing import Protocol

import cv2
import numpy as np

from hematovision.calibration.colour import colour_sample, lab_summary
from hematovision.calibration.correct import correct_colour, correct_illumination
from hematovision.crop import NO_JITTER, CropGeometry, crop_matrix, cut_crops
from hematovision.errors import CalibrationError
from hematovision.calibration.profile import CalibrationProfile, check_against_bundle, check_image_size

from .classify import Prediction, classify_crops, cut_cells
from .field_cut import FieldCut, cut_field
from .model_bundle import Bundle
from .segment import (DEFAULT_PARAMS, Detection, SegmentParams, Segmentation, check_field,
                      estimate_um_per_pixel, segment)

logger = logging.getLogger(__name__)

ESTIMATED_SOURCE = "estimated from red cells (median over fields)"
NO_PIXEL_SIZE = "unknown: no red cells measured"
SETTLED_ESTIMATES = 15  # red-cell estimates on every field until this many (1.4 ms each; fewer left a
# 34-field sample 22% off, the median of its first five fields) ...
REESTIMATE_EVERY = 5  # ... then on every fifth field only
ESTIMATE_HISTORY = 50  # the pixel size is the median of this many latest estimates
THUMBNAIL_PX = 224  # side of the verification thumbnail kept per counted cell (the crop's square)
# Outside the field a thumbnail is this neutral grey (never a mirror image, which would show a cell twice),
# and the field's edge is drawn in CUT_EDGE_RGB, CUT_EDGE_PX wide.
THUMBNAIL_FILL_RGB = (128, 128, 128)
CUT_EDGE_RGB = (255, 176, 0)
CUT_EDGE_PX = 3


@dataclass(frozen=True)
class CellResult:
    """A classified white cell of one field, with its verification thumbnail and the field's name."""

    detection: Detection
    prediction: Prediction
    thumbnail_jpeg: bytes
    field: str = ""

    def to_json(self) -> dict:
        """The cell in count --json: its box, label and confidence, and with a novelty model its novelty
        score and whether that made it unfamiliar (why an "unidentified" was left without a class)."""
        out = {"bbox": list(self.detection.bbox), "label": self.prediction.label,
               "confidence": round(self.prediction.confidence, 4)}
        if self.prediction.novelty is not None:
            out.update(novelty=round(self.prediction.novelty, 3), unfamiliar=self.prediction.unfamiliar)
        return out


@dataclass(frozen=True)
class FieldResult:
    """Everything found in one field."""

    width: int
    height: int
    cells: tuple[CellResult, ...]
    edge_cells: int
    um_per_pixel: float
    pixel_size_source: str
    kind: str = "used"  # or "blur" / "motion": a scan frame that counted nothing
    slide_xy_um: tuple[tuple[float, float], ...] = ()  # of `cells`
    colour: tuple[float, ...] | None = None  # a used frame's colour summary (calibration.colour.SUMMARY_KEYS)
    found: tuple[Detection, ...] = ()  # every white cell segmented, whole or cut by the edge, new or not
    prepared: np.ndarray | None = dataclass_field(default=None, repr=False, compare=False)  # the corrected frame


@dataclass(frozen=True)
class Selection:
    """The new cells of a frame and where they lie on the slide; kind says if the frame was used."""

    kind: str  # "used", "blur" or "motion" (state.FRAME_KINDS)
    cells: tuple[Detection, ...]
    slide_xy_um: tuple[tuple[float, float], ...]


class CellSelector(Protocol):
    """Decides which detections of a frame are cells not counted before; its state survives restarts."""

    def select(self, image, seg: Segmentation) -> Selection: ...

    def to_dict(self) -> dict | None: ...

    def new_keyframes(self) -> tuple[tuple[int, dict], ...]:
        """What the last `select` added that `to_dict` leaves out, stored once beside it."""
        ...


class FieldSelector:
    """Every frame is a new field (separate fields, as the committed samples): every whole cell is new."""

    def select(self, image, seg: Segmentation) -> Selection:
        xy = tuple((d.center[0] * seg.um_per_pixel, d.center[1] * seg.um_per_pixel) for d in seg.cells)
        return Selection("used", seg.cells, xy)

    def to_dict(self) -> dict | None:
        return None

    def new_keyframes(self) -> tuple[tuple[int, dict], ...]:
        return ()


def outside_field(shape: tuple[int, ...], matrix: np.ndarray, size: int) -> np.ndarray:
    """(size, size) mask of the crop pixels that `matrix` (crop to image) maps outside an image of `shape`."""
    v, u = np.mgrid[0:size, 0:size].astype(np.float64)
    x = matrix[0, 0] * u + matrix[0, 1] * v + matrix[0, 2]
    y = matrix[1, 0] * u + matrix[1, 1] * v + matrix[1, 2]
    return (x < -0.5) | (y < -0.5) | (x > shape[1] - 0.5) | (y > shape[0] - 0.5)


def mark_outside(crop: np.ndarray, outside: np.ndarray) -> np.ndarray:
    """The crop with what lies outside the field neutral grey and the field's edge drawn as a line."""
    if not outside.any():
        return crop
    out = crop.copy()
    out[outside] = THUMBNAIL_FILL_RGB
    kernel = np.ones((2 * CUT_EDGE_PX + 1, 2 * CUT_EDGE_PX + 1), np.uint8)
    near_edge = cv2.dilate(outside.astype(np.uint8), kernel).astype(bool) & ~outside
    out[near_edge] = CUT_EDGE_RGB
    return out


def cell_thumbnails(image: np.ndarray, centers, um_per_pixel: float, geometry: CropGeometry,
                    colour=None) -> list[bytes]:
    """JPEG verification thumbnails: the square the model sees around each cell, THUMBNAIL_PX wide,
    colour-corrected by `colour` (a function of (N, S, S, 3) crops) when given; near the field's border
    the part outside the field is grey, with the edge marked (`mark_outside`)."""
    size = replace(geometry, input_size=THUMBNAIL_PX)
    crops = cut_crops(image, list(centers), um_per_pixel, size)
    if colour is not None and len(crops):
        crops = colour(crops)
    return [_jpeg(mark_outside(crop, outside_field(image.shape, crop_matrix(c, um_per_pixel, size, NO_JITTER),
                                                   THUMBNAIL_PX))) for crop, c in zip(crops, centers)]


def _jpeg(rgb: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".jpg", np.ascontiguousarray(rgb[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 85])
    return data.tobytes()


class FieldPipeline:
    """Corrects, segments and classifies fields with one bundle and one calibration profile."""

    def __init__(self, bundle: Bundle, profile: CalibrationProfile | None = None,
                 params: SegmentParams = DEFAULT_PARAMS):
        self.bundle, self.profile, self.params = bundle, profile, params
        self.um_per_pixel = profile.pixel_size.um_per_pixel if profile and profile.pixel_size else None
        self._estimates: list[float] = []
        self._estimated_um = float("nan")  # median of the latest estimates, updated with them
        self._fields = 0
        if self.um_per_pixel and bundle.um_per_pixel:
            check_against_bundle(profile, bundle.um_per_pixel)
        lab_summary(np.zeros((2, 2, 3), np.uint8))  # OpenCV builds its Lab tables once (0.1 s): here, not in a frame

    def state(self) -> dict:
        """What the pipeline carries from field to field, for the daemon to persist."""
        return {"pixel_size_estimates": list(self._estimates), "fields": self._fields}

    def restore(self, state: dict | None) -> None:
        """Put back a `state()`; None leaves a fresh pipeline as it is."""
        if state:
            self._estimates = [float(v) for v in state["pixel_size_estimates"]]
            self._fields = int(state["fields"])
            self._update_estimate()

    @property
    def pixel_size_um(self) -> float:
        """The pixel size the next field is segmented at: the profile's, else the running estimate (nan: none)."""
        return self.um_per_pixel or self._estimated_um

    def _update_estimate(self) -> None:
        self._estimates = self._estimates[-ESTIMATE_HISTORY:]
        self._estimated_um = float(np.median(self._estimates)) if self._estimates else float("nan")

    def prepare(self, image: np.ndarray, name: str = "frame") -> np.ndarray:
        """Check a frame and correct its illumination (flat field, white balance, exposure).

        The colour mapping is left to the crops (`classify`): measured on the TXL-PBC labs it helps
        the classifier but costs the segmenter detections. Raises DataError / ConfigError.
        """
        check_field(image, self.params)
        if self.profile is not None:
            check_image_size(self.profile, image.shape, name)
            image = correct_illumination(image, self.profile)
        return image

    def detect(self, image: np.ndarray):
        """Segment with the profile's pixel size, else a running red-cell estimate of this microscope.

        Without a profile each field's red cells give an estimate; the median over the fields seen
        so far is used, which steadies single-field failures. A field with no red cells to measure
        (an empty field) uses that median, or gives no cells when nothing has been measured yet.
        """
        if self.um_per_pixel:
            return segment(image, self.params, self.um_per_pixel)
        self._fields += 1
        if len(self._estimates) < SETTLED_ESTIMATES or self._fields % REESTIMATE_EVERY == 0:
            try:
                self._estimates.append(estimate_um_per_pixel(image, self.params))
                self._update_estimate()
            except CalibrationError as err:
                logger.debug("no red-cell estimate from this field: %s", err)
        if not self._estimates:
            logger.info("no pixel size for this field and none measured yet: no cells counted")
            return Segmentation((), (), float("nan"), NO_PIXEL_SIZE)
        seg = segment(image, self.params, self._estimated_um)
        return replace(seg, pixel_size_source=ESTIMATED_SOURCE)

    def classify(self, image: np.ndarray, cells, um_per_pixel: float, field: str = "") -> tuple[CellResult, ...]:
        """Crops of `cells` classified in one batch, with their verification thumbnails and the field's name."""
        if not cells:  # an empty field, perhaps with no pixel size measured yet: nothing to cut
            return ()
        crops = self._colour(cut_cells(image, [c.center for c in cells], um_per_pixel, self.bundle))
        predictions = classify_crops(self.bundle, crops)
        thumbnails = cell_thumbnails(image, [c.center for c in cells], um_per_pixel, self.bundle.geometry,
                                     self._colour)
        return tuple(CellResult(d, p, t, field) for d, p, t in zip(cells, predictions, thumbnails))

    def _colour(self, crops: np.ndarray) -> np.ndarray:
        """Crops mapped by the profile's colour calibration (as they are without one)."""
        if self.profile is None:
            return crops
        return correct_colour(crops.reshape(-1, crops.shape[2], 3), self.profile).reshape(crops.shape)

    def field_cuts(self, result: FieldResult) -> tuple[FieldCut, ...]:
        """Each new cell of a processed frame in its field (field_cut.cut_field), as the classifier sees it: the
        corrected frame, colours mapped by the profile."""
        if result.prepared is None or not result.cells:
            return ()
        cuts = [cut_field(result.prepared, c.detection.center, result.um_per_pixel, self.bundle.geometry)
                for c in result.cells]
        if self.profile is None:
            return tuple(cuts)
        return tuple(replace(c, image=correct_colour(c.image, self.profile)) for c in cuts)

    def colour(self, image: np.ndarray) -> tuple[float, ...]:
        """The colour summary of a prepared frame as the classifier sees it (the profile's colour mapping
        applied), from a few thousand of its pixels: compared with the bundle's training labs."""
        sample = colour_sample(image)
        return lab_summary(correct_colour(sample, self.profile) if self.profile is not None else sample)

    def process(self, image: np.ndarray, name: str = "frame", selector: CellSelector | None = None) -> FieldResult:
        """One frame: the cells the selector calls new (default: every whole white cell) classified;
        cells cut by the edge counted apart; a used frame's colour summarised. Raises DataError for a
        frame that cannot be used."""
        image = self.prepare(image, name)
        seg = self.detect(image)
        selection = (selector or FieldSelector()).select(image, seg)
        cells = self.classify(image, selection.cells, seg.um_per_pixel, os.path.basename(name))
        colour = self.colour(image) if selection.kind == "used" else None
        return FieldResult(image.shape[1], image.shape[0], cells, len(seg.edge_cells), seg.um_per_pixel,
                           seg.pixel_size_source, selection.kind, selection.slide_xy_um, colour,
                           seg.cells + seg.edge_cells, image)
