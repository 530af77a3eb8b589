"""One microscope field through the stages: correct, segment, cut, classify."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Protocol

import cv2
import numpy as np

from hematovision.calibration.correct import correct_colour, correct_illumination
from hematovision.errors import CalibrationError
from hematovision.calibration.profile import CalibrationProfile, check_against_bundle, check_image_size

from .classify import Prediction, classify_crops, cut_cells
from .model_bundle import Bundle
from .segment import (DEFAULT_PARAMS, Detection, SegmentParams, Segmentation, check_field,
                      estimate_um_per_pixel, segment)

logger = logging.getLogger(__name__)

ESTIMATED_SOURCE = "estimated from red cells (median over fields)"
NO_PIXEL_SIZE = "unknown: no red cells measured"
SETTLED_ESTIMATES = 5  # red-cell estimates on every field until this many ...
REESTIMATE_EVERY = 20  # ... then on every twentieth field only
ESTIMATE_HISTORY = 50  # the pixel size is the median of this many latest estimates
THUMBNAIL_PX = 112  # side of the verification thumbnail kept per counted cell (half a 224 crop)


@dataclass(frozen=True)
class CellResult:
    """A classified white cell of one field."""

    detection: Detection
    prediction: Prediction
    thumbnail_jpeg: bytes

    def to_json(self) -> dict:
        return {"bbox": list(self.detection.bbox), "label": self.prediction.label,
                "confidence": round(self.prediction.confidence, 4)}


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


def thumbnail(crop: np.ndarray) -> bytes:
    small = cv2.resize(crop, (THUMBNAIL_PX, THUMBNAIL_PX), interpolation=cv2.INTER_AREA)
    ok, data = cv2.imencode(".jpg", small[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 85])
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

    def state(self) -> dict:
        """What the pipeline carries from field to field, for the daemon to persist."""
        return {"pixel_size_estimates": list(self._estimates), "fields": self._fields}

    def restore(self, state: dict | None) -> None:
        """Put back a `state()`; None leaves a fresh pipeline as it is."""
        if state:
            self._estimates = [float(v) for v in state["pixel_size_estimates"]]
            self._fields = int(state["fields"])
            self._update_estimate()

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

    def classify(self, image: np.ndarray, cells, um_per_pixel: float) -> tuple[CellResult, ...]:
        """Crops of `cells` classified in one batch, with their verification thumbnails."""
        if not cells:  # an empty field, perhaps with no pixel size measured yet: nothing to cut
            return ()
        crops = cut_cells(image, [c.center for c in cells], um_per_pixel, self.bundle)
        if self.profile is not None:
            crops = correct_colour(crops.reshape(-1, crops.shape[2], 3), self.profile).reshape(crops.shape)
        predictions = classify_crops(self.bundle, crops)
        return tuple(CellResult(d, p, thumbnail(c)) for d, p, c in zip(cells, predictions, crops))

    def process(self, image: np.ndarray, name: str = "frame", selector: CellSelector | None = None) -> FieldResult:
        """One frame: the cells the selector calls new (default: every whole white cell) classified;
        cells cut by the edge counted apart. Raises DataError for a frame that cannot be used."""
        image = self.prepare(image, name)
        seg = self.detect(image)
        selection = (selector or FieldSelector()).select(image, seg)
        cells = self.classify(image, selection.cells, seg.um_per_pixel)
        return FieldResult(image.shape[1], image.shape[0], cells, len(seg.edge_cells), seg.um_per_pixel,
                           seg.pixel_size_source, selection.kind, selection.slide_xy_um)
