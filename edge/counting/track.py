"""Tracking: count each white cell once while the stage pans, keeping cells in slide coordinates."""

from __future__ import annotations

import base64
import logging
import math
import statistics
from collections import deque
from dataclasses import asdict, dataclass, field, replace

import cv2
import numpy as np

from hematovision.errors import DataError

from ..vision.segment import DEFAULT_PARAMS, Detection, SegmentParams, Segmentation, focus_measure
from .register import DEFAULT_REGISTER, RegisterParams, Registration, WorkFrame, prepare, register

logger = logging.getLogger(__name__)

STATE_FORMAT = "hematovision.count-once/1"
COUNTED, BLURRED, MOVING = "counted", "skipped: blurred", "skipped: moving"
JUMP, RELOCALISED, NEW_MAP = "jump", "relocalised", "new map"


@dataclass(frozen=True)
class TrackParams:
    """Settings of the count-once tracker; lengths in um.

    Positions live in "maps": a map is a coordinate frame that frame-to-frame registration
    keeps consistent. A jump that cannot be relocalised starts a new map; a cell of another
    map is recognised by its appearance only (a normalised thumbnail), never by position.
    """

    register: RegisterParams = DEFAULT_REGISTER
    relocalise: RegisterParams = RegisterParams(min_response=0.1, min_agreement=0.7)  # against keyframes
    focus_ratio: float = 0.5  # a frame sharper than this fraction of the recent median is in focus ...
    min_focus: float = 0.0005  # ... and than this floor (frame_focus units; sharp BCCD fields: 0.0006 up)
    focus_history: int = 15  # frames in the recent median
    max_count_speed_um: float = 12.0  # per frame; faster frames are smeared and not counted
    match_radius_um: float = 6.0  # a cell this close to a counted cell of the same map is that cell
    descriptor_side_um: float = 14.0  # thumbnail square around the cell centre ...
    descriptor_px: int = 24  # ... resampled to this many pixels a side ...
    descriptor_highpass_um: float = 1.2  # ... less its blur by a Gaussian this wide (keeps texture, drops the blob)
    min_similarity: float = 0.7  # thumbnails correlating above this show the same cell
    keyframe_spacing_um: float = 12.0  # a keyframe is kept when none of its map lies this close
    max_keyframes: int = 500  # the oldest are dropped beyond this


DEFAULT_TRACK = TrackParams()


@dataclass(frozen=True, eq=False)
class CountedCell:
    """A counted white cell: where it lies on the slide (in its map) and what it looks like."""

    id: int
    map: int
    position_um: tuple[float, float]
    descriptor: np.ndarray  # int8, descriptor_px^2 values, zero mean, norm about 127
    frame: int  # index of the frame it was counted in

    def to_dict(self) -> dict:
        return {"id": self.id, "map": self.map, "x_um": self.position_um[0],
                "y_um": self.position_um[1], "frame": self.frame,
                "descriptor": base64.b64encode(self.descriptor.astype(np.int8).tobytes()).decode("ascii")}

    @classmethod
    def from_dict(cls, data: dict) -> CountedCell:
        descriptor = np.frombuffer(base64.b64decode(data["descriptor"]), dtype=np.int8).copy()
        return cls(int(data["id"]), int(data["map"]), (float(data["x_um"]), float(data["y_um"])),
                   descriptor, int(data["frame"]))


@dataclass(frozen=True)
class NewCell:
    """A detection of this frame that no counted cell accounts for: classify and count it."""

    detection: Detection
    cell: CountedCell


@dataclass(frozen=True)
class TrackCounters:
    """Running totals of a scan."""

    frames: int = 0
    counted_frames: int = 0
    skipped_blur: int = 0
    skipped_motion: int = 0
    jumps: int = 0  # frames whose registration to the previous one failed
    relocalised: int = 0  # ... and that were placed again against a keyframe
    new_maps: int = 0  # ... and that were not, starting a new map
    cells: int = 0
    recognised: int = 0  # cells held back because they look like a counted cell of another map


@dataclass(frozen=True)
class FrameResult:
    """What feeding one frame did: the new cells to classify and count, and why not, if not."""

    index: int
    status: str  # COUNTED, BLURRED or MOVING
    new_cells: tuple[NewCell, ...]
    seen_again: int  # whole cells in view that were already counted
    map: int
    position_um: tuple[float, float]  # top-left corner of the frame in its map
    registration: Registration | None  # to the previous frame; None for the first frame
    events: tuple[str, ...] = ()  # JUMP, then RELOCALISED or NEW_MAP


@dataclass(frozen=True, eq=False)
class _Keyframe:
    map: int
    position_um: tuple[float, float]
    work: WorkFrame


@dataclass
class _Placement:
    registration: Registration | None
    speed_um: float = 0.0  # per frame; 0 when unknown (first frame, after a jump)
    events: list = field(default_factory=list)


def frame_focus(image_rgb: np.ndarray, um_per_pixel: float, params: SegmentParams = DEFAULT_PARAMS) -> float:
    """Focus of a whole frame (segment.focus_measure over the frame): the score `feed` expects."""
    h, w = image_rgb.shape[:2]
    return focus_measure(image_rgb, (0, 0, w, h), um_per_pixel, params)


def descriptor(image_rgb: np.ndarray, center: tuple[float, float], um_per_pixel: float,
               params: TrackParams = DEFAULT_TRACK) -> np.ndarray:
    """High-passed, normalised gray thumbnail (int8) of the `descriptor_side_um` square around a
    cell centre. Every white cell is a dark blob on a pale ground; the high-pass keeps what tells
    two cells apart (nucleus lobes, granules, the red cells around)."""
    side = max(params.descriptor_px, int(round(params.descriptor_side_um / um_per_pixel)))
    gray = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2GRAY)
    patch = cv2.getRectSubPix(gray, (side, side), (float(center[0]), float(center[1])))
    small = cv2.resize(patch, (params.descriptor_px,) * 2, interpolation=cv2.INTER_AREA).astype(np.float32)
    sigma = params.descriptor_highpass_um * params.descriptor_px / params.descriptor_side_um
    small = (small - cv2.GaussianBlur(small, (0, 0), sigma)).ravel()
    small -= small.mean()
    norm = float(np.linalg.norm(small))
    return np.round(small * (127.0 / norm if norm > 0 else 0.0)).astype(np.int8)


def similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Correlation of a descriptor with one (or each row of several) others, -1..1."""
    return (np.asarray(b, np.float32) @ a.astype(np.float32)) / (127.0 * 127.0)


class CountOnce:
    """Feeds frames of a panned slide and says which white cells are new (see `feed`).

    The state (counted cells, current map and position, the last frame at registration
    resolution, recent focus) round-trips through `to_dict` / `from_dict`.
    """

    def __init__(self, params: TrackParams = DEFAULT_TRACK):
        self.params = params
        self._cells: list[CountedCell] = []
        self._counters = TrackCounters()
        self._focus: deque[float] = deque(maxlen=params.focus_history)
        self._keyframes: deque[_Keyframe] = deque(maxlen=params.max_keyframes)
        self._reference: WorkFrame | None = None
        self._sharp: _Keyframe | None = None  # the last frame in focus, when the reference is not
        self._since_reference = 1
        self._map, self._maps, self._position = 0, 1, (0.0, 0.0)
        self._index = 0
        self._keyframes_added = 0  # ever, numbering them: the daemon stores each once, by number

    @property
    def cells(self) -> tuple[CountedCell, ...]:
        return tuple(self._cells)

    @property
    def counters(self) -> TrackCounters:
        return self._counters

    @property
    def keyframes_added(self) -> int:
        return self._keyframes_added

    def keyframes_since(self, count: int) -> tuple[tuple[int, dict], ...]:
        """The keyframes added after the first `count`, as (number, state) to store beside the
        frame's state (`to_dict` leaves keyframes out); `from_dict` takes them back under "keyframes"."""
        new = min(self._keyframes_added - count, len(self._keyframes))
        if new <= 0:
            return ()
        first = self._keyframes_added - new
        return tuple((first + i, _key_to_dict(k)) for i, k in enumerate(list(self._keyframes)[-new:]))

    def feed(self, frame_rgb: np.ndarray, segmentation: Segmentation, focus: float) -> FrameResult:
        """Place a frame on the slide and return the whole cells in it not counted before.

        `focus` is the frame's focus score (`frame_focus`). Blurred frames and frames taken
        while the stage moves faster than `max_count_speed_um` count nothing. A failed
        registration is reported as a JUMP event, then RELOCALISED (placed against a keyframe)
        or NEW_MAP (cells of other maps are then recognised by appearance). Raises DataError
        for a frame that is not RGB uint8 or changes size mid-scan.
        """
        work = prepare(frame_rgb, self._scale(segmentation), self.params.register)
        blurred = self._blurred(focus)
        placement = self._place(work, blurred)
        status = BLURRED if blurred else MOVING if placement.speed_um > self.params.max_count_speed_um else COUNTED
        new, again = ((), 0)
        if status == COUNTED:
            new, again = self._count(frame_rgb, segmentation)
            self._add_keyframe(work)
        self._tally(status, placement.events, len(new))
        result = FrameResult(self._index, status, new, again, self._map, self._position,
                             placement.registration, tuple(placement.events))
        self._index += 1
        return result

    def _scale(self, segmentation: Segmentation) -> float:
        """The scan's pixel size: set by its first frame, whatever later per-frame estimates say
        (a camera's magnification does not change mid-scan; an estimate that wanders would)."""
        return self._reference.um_per_pixel if self._reference is not None else segmentation.um_per_pixel

    def _blurred(self, focus: float) -> bool:
        """Judge a frame's focus against the recent median, then remember it."""
        recent = statistics.median(self._focus) if self._focus else focus
        self._focus.append(float(focus))
        return focus < self.params.min_focus or focus < self.params.focus_ratio * recent

    def _place(self, work: WorkFrame, blurred: bool) -> _Placement:
        """Register to the previous frame; on failure relocalise, or start a new map."""
        if self._reference is None and not self._cells and not self._keyframes:
            self._skip_blurred(work, blurred)
            self._set_reference(work)
            return _Placement(None)
        if self._reference is not None:
            limit = self.params.register.max_speed_um * self._since_reference
            reg = register(self._reference, work, self.params.register, max_shift_um=limit)
            if reg.ok:
                speed = reg.distance_um / self._since_reference
                self._position = (self._position[0] + reg.shift_um[0], self._position[1] + reg.shift_um[1])
                self._skip_blurred(work, blurred)
                self._set_reference(work)
                return _Placement(reg, speed)
            logger.warning("registration lost at frame %d (%s: response %.3f, agreement %.2f)",
                           self._index, reg.reason, reg.response, reg.agreement)
        else:
            reg = None
        return self._recover(work, reg, blurred)

    def _recover(self, work: WorkFrame, reg: Registration | None, blurred: bool) -> _Placement:
        placement = _Placement(reg, events=[JUMP])
        found = self._relocalise(work)
        if found is not None:
            self._map, self._position = found
            placement.events.append(RELOCALISED)
            logger.info("frame %d relocalised in map %d at (%.1f, %.1f) um", self._index, self._map, *self._position)
        elif blurred:
            self._since_reference += 1  # keep the last position; the next sharp frame tries again
            return placement
        else:
            self._map, self._maps, self._position = self._maps, self._maps + 1, (0.0, 0.0)
            placement.events.append(NEW_MAP)
            logger.warning("frame %d could not be relocalised: new map %d, its cells are checked against "
                           "counted cells by appearance", self._index, self._map)
        self._sharp = None if blurred else _Keyframe(self._map, self._position, work)
        self._set_reference(work)
        return placement

    def _skip_blurred(self, work: WorkFrame, blurred: bool) -> None:
        """Place a sharp frame against the last sharp one, not through blurred frames in between:
        a smeared frame registers with a bias of a few pixels that would add up along the scan."""
        sharp = self._sharp
        if not blurred and sharp is not None and sharp.map == self._map and sharp.work is not self._reference:
            guess = (self._position[0] - sharp.position_um[0], self._position[1] - sharp.position_um[1])
            reg = register(sharp.work, work, self.params.register, max_shift_um=math.inf, guess_um=guess)
            logger.debug("frame %d placed against the last sharp frame: %s", self._index, reg)
            if reg.ok:
                self._position = (sharp.position_um[0] + reg.shift_um[0], sharp.position_um[1] + reg.shift_um[1])
        if not blurred:
            self._sharp = _Keyframe(self._map, self._position, work)

    def _set_reference(self, work: WorkFrame) -> None:
        self._reference, self._since_reference = work, 1

    def _relocalise(self, work: WorkFrame) -> tuple[int, tuple[float, float]] | None:
        """(map, position) of a frame found against the last frame or a keyframe, nearest first."""
        candidates = list(self._keyframes)
        if self._reference is not None:
            candidates.append(_Keyframe(self._map, self._position, self._reference))
        here = np.array(self._position)
        candidates.sort(key=lambda k: (k.map != self._map, float(np.hypot(*(np.array(k.position_um) - here)))))
        for key in candidates:
            if key.work.gray.shape != work.gray.shape:
                continue
            reg = register(key.work, work, self.params.relocalise, max_shift_um=math.inf)
            if reg.ok:
                return key.map, (key.position_um[0] + reg.shift_um[0], key.position_um[1] + reg.shift_um[1])
        return None

    def _count(self, frame_rgb: np.ndarray, segmentation: Segmentation) -> tuple[tuple[NewCell, ...], int]:
        """The whole cells of a placed frame that are not counted yet; they are added."""
        um = self._scale(segmentation)
        new, again = [], 0
        for detection in segmentation.cells:
            position = (self._position[0] + detection.center[0] * um, self._position[1] + detection.center[1] * um)
            if self._near_counted(position):
                again += 1
                continue
            look = descriptor(frame_rgb, detection.center, um, self.params)
            if self._looks_counted(look):
                again += 1
                self._counters = replace(self._counters, recognised=self._counters.recognised + 1)
                continue
            cell = CountedCell(len(self._cells), self._map, position, look, self._index)
            self._cells.append(cell)
            new.append(NewCell(detection, cell))
            logger.debug("frame %d: new cell %d at (%.1f, %.1f) um in map %d", self._index, cell.id, *position, self._map)
        return tuple(new), again

    def _near_counted(self, position: tuple[float, float]) -> bool:
        """Whether a counted cell of the current map lies within `match_radius_um`."""
        same = [c.position_um for c in self._cells if c.map == self._map]
        if not same:
            return False
        gaps = np.hypot(*(np.asarray(same) - np.asarray(position)).T)
        return bool(gaps.min() <= self.params.match_radius_um)

    def _looks_counted(self, look: np.ndarray) -> bool:
        """Whether a counted cell of another map has the same appearance."""
        others = [c.descriptor for c in self._cells if c.map != self._map]
        return bool(others) and bool(similarity(look, np.stack(others)).max() >= self.params.min_similarity)

    def _add_keyframe(self, work: WorkFrame) -> None:
        near = [k for k in self._keyframes if k.map == self._map and
                math.dist(k.position_um, self._position) < self.params.keyframe_spacing_um]
        if not near:
            self._keyframes.append(_Keyframe(self._map, self._position, work))
            self._keyframes_added += 1

    def _tally(self, status: str, events: list, new_cells: int) -> None:
        c = self._counters
        self._counters = replace(
            c, frames=c.frames + 1, counted_frames=c.counted_frames + (status == COUNTED),
            skipped_blur=c.skipped_blur + (status == BLURRED), skipped_motion=c.skipped_motion + (status == MOVING),
            jumps=c.jumps + (JUMP in events), relocalised=c.relocalised + (RELOCALISED in events),
            new_maps=c.new_maps + (NEW_MAP in events), cells=c.cells + new_cells)

    def to_dict(self, keyframes: bool = False) -> dict:
        """The state as JSON-ready values; keyframes (about 10 kB each) only when asked."""
        state = {"format": STATE_FORMAT, "frame_index": self._index, "map": self._map, "maps": self._maps,
                 "position_um": list(self._position), "since_reference": self._since_reference,
                 "keyframes_added": self._keyframes_added,
                 "focus_history": list(self._focus), "counters": asdict(self._counters),
                 "cells": [c.to_dict() for c in self._cells],
                 "reference": _work_to_dict(self._reference) if self._reference is not None else None,
                 "sharp": self._sharp_to_dict()}
        if keyframes:
            state["keyframes"] = [_key_to_dict(k) for k in self._keyframes]
        return state

    @classmethod
    def from_dict(cls, state: dict, params: TrackParams = DEFAULT_TRACK) -> CountOnce:
        """Rebuild a tracker from `to_dict`. Raises DataError for a state it cannot read."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise DataError(f"not a count-once state (format {state.get('format') if isinstance(state, dict) else None!r},"
                            f" expected {STATE_FORMAT!r}): start a new scan")
        try:
            return cls(params)._restore(state)
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"count-once state is damaged ({err!r}): start a new scan") from err

    def _restore(self, state: dict) -> CountOnce:
        self._index, self._map, self._maps = int(state["frame_index"]), int(state["map"]), int(state["maps"])
        self._position = tuple(float(v) for v in state["position_um"])
        self._since_reference = int(state["since_reference"])
        self._focus.extend(float(v) for v in state["focus_history"])
        self._counters = TrackCounters(**state["counters"])
        self._cells = [CountedCell.from_dict(c) for c in state["cells"]]
        self._reference = _work_from_dict(state["reference"]) if state["reference"] else None
        self._sharp = self._sharp_from_dict(state.get("sharp"))
        self._keyframes.extend(_key_from_dict(k) for k in state.get("keyframes", ()))
        self._keyframes_added = int(state.get("keyframes_added", len(self._keyframes)))
        return self

    def _sharp_to_dict(self) -> dict | None:
        """The last sharp frame; when it is the reference, said so (`_skip_blurred` tells them apart
        by identity, which a restored state must keep)."""
        if self._sharp is None:
            return None
        if self._sharp.work is self._reference:
            return {"map": self._sharp.map, "position_um": list(self._sharp.position_um), "is_reference": True}
        return _key_to_dict(self._sharp)

    def _sharp_from_dict(self, data: dict | None) -> _Keyframe | None:
        if not data:
            return None
        if data.get("is_reference"):
            return _Keyframe(int(data["map"]), tuple(float(v) for v in data["position_um"]), self._reference)
        return _key_from_dict(data)


def _key_to_dict(key: _Keyframe) -> dict:
    return {"map": key.map, "position_um": list(key.position_um), **_work_to_dict(key.work)}


def _key_from_dict(data: dict) -> _Keyframe:
    return _Keyframe(int(data["map"]), tuple(float(v) for v in data["position_um"]), _work_from_dict(data))


def _work_to_dict(work: WorkFrame) -> dict:
    ok, png = cv2.imencode(".png", work.gray)
    return {"png": base64.b64encode(png.tobytes()).decode("ascii"), "um_per_pixel": work.um_per_pixel,
            "scale": work.scale}


def _work_from_dict(data: dict) -> WorkFrame:
    gray = cv2.imdecode(np.frombuffer(base64.b64decode(data["png"]), np.uint8), cv2.IMREAD_GRAYSCALE)
    if gray is None:
        raise ValueError("reference frame is not a readable PNG")
    return WorkFrame(gray=gray, um_per_pixel=float(data["um_per_pixel"]), scale=float(data["scale"]))
