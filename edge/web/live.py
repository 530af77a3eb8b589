"""The live view: the frame loop's latest frame handed over without waiting, drawn and judged off the loop."""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass

import cv2
import numpy as np

from ..counting.track import DEFAULT_TRACK, frame_focus
from ..vision.segment import DEFAULT_PARAMS

JPEG_QUALITY = 75
RECENT_FOCUS = 30  # frames whose focus the indicator's "recent median" is taken over
RENDER_EVERY_S = 0.5  # a frame is drawn and judged at most this often, however fast frames come and many ask


@dataclass(frozen=True)
class ExposureLimits:
    """When the exposure indicator says a frame is too dark or too bright (grey levels 0..255)."""

    min_mean: float = 60.0  # mean grey below this: too dark
    clip_level: int = 250  # a pixel at or above this is clipped ...
    max_clipped_fraction: float = 0.05  # ... and more clipped pixels than this: too bright


@dataclass(frozen=True)
class LiveBox:
    """A white cell found in the frame: its box, and its class when it was counted in this frame."""

    bbox: tuple[int, int, int, int]
    label: str  # class name; "" for a cell counted before (a scan) or cut by the frame's edge
    touches_edge: bool = False


@dataclass(frozen=True)
class LiveFrame:
    """What the frame loop hands to the live view: the frame as read (never changed afterwards), what was found
    in it, and why it counted nothing ("blur", "motion", "unusable", "no specimen") when it did not."""

    index: int
    name: str
    image: np.ndarray
    kind: str
    boxes: tuple[LiveBox, ...]
    um_per_pixel: float
    at: float  # time.time() when it was counted


class LiveSlot:
    """The latest frame, from the frame loop to the web page. Publishing replaces one reference: the loop never
    takes a lock, copies or encodes anything for the page, so it never waits on it."""

    def __init__(self) -> None:
        self._latest: LiveFrame | None = None

    def publish(self, frame: LiveFrame) -> None:
        self._latest = frame

    @property
    def latest(self) -> LiveFrame | None:
        return self._latest


@dataclass(frozen=True)
class Indicators:
    """Focus and exposure of one frame, with their verdicts."""

    focus: float | None  # frame_focus score; None when it cannot be measured
    in_focus: bool | None
    brightness: float  # mean grey level 0..255
    clipped: float  # fraction of pixels at or above the clip level
    exposure: str  # "ok", "too dark" or "too bright"

    def to_dict(self) -> dict:
        return {"focus": None if self.focus is None else round(self.focus, 6), "in_focus": self.in_focus,
                "brightness": round(self.brightness, 1), "clipped": round(self.clipped, 4),
                "exposure": self.exposure}


def exposure_of(image: np.ndarray, limits: ExposureLimits = ExposureLimits()) -> tuple[float, float, str]:
    """(mean grey, clipped fraction, verdict) of an RGB frame, measured on every fourth pixel."""
    grey = cv2.cvtColor(np.ascontiguousarray(image[::4, ::4]), cv2.COLOR_RGB2GRAY)
    mean, clipped = float(grey.mean()), float((grey >= limits.clip_level).mean())
    verdict = "too dark" if mean < limits.min_mean else "too bright" if clipped > limits.max_clipped_fraction else "ok"
    return mean, clipped, verdict


def focus_of(image: np.ndarray, um_per_pixel: float) -> float | None:
    """The frame's focus score as the scan tracker measures it (at its own pixel size when none is known)."""
    scale = um_per_pixel if math.isfinite(um_per_pixel) and um_per_pixel > 0 else DEFAULT_PARAMS.focus_um_per_pixel
    try:
        return frame_focus(image, scale)
    except (cv2.error, ValueError, ZeroDivisionError):
        return None


def draw(frame: LiveFrame, width: int) -> bytes:
    """The frame scaled to `width` pixels (never up) as JPEG, each cell boxed: counted in this frame in blue with
    its class, counted before in grey, cut by the edge in orange."""
    h, w = frame.image.shape[:2]
    scale = min(1.0, width / w)
    small = cv2.resize(frame.image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    bgr = np.ascontiguousarray(small[:, :, ::-1])
    for box in frame.boxes:
        x0, y0, x1, y1 = (round(v * scale) for v in box.bbox)
        colour = (0, 140, 255) if box.touches_edge else (235, 99, 37) if box.label else (150, 150, 150)
        cv2.rectangle(bgr, (x0, y0), (x1, y1), colour, 2)
        if box.label:
            _label(bgr, box.label, x0, y0, colour)
    ok, data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    return data.tobytes()


def _label(bgr: np.ndarray, text: str, x: int, y: int, colour) -> None:
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1)
    top = max(0, y - th - base - 2)
    cv2.rectangle(bgr, (x, top), (x + tw + 4, top + th + base + 2), colour, -1)
    cv2.putText(bgr, text, (x + 2, top + th + 1), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)


@dataclass(frozen=True)
class Rendered:
    """One frame as the page shows it: the JPEG, its indicators and what the frame loop said about it."""

    index: int
    jpeg: bytes
    indicators: Indicators
    frame: LiveFrame


class LiveView:
    """Draws and judges the latest frame for the page (in the web server's threads: the frame loop only
    publishes), at most once every `every_s` seconds however many ask and however fast frames come: the page
    asks once a second, and a frame loop faster than that needs its processor more than the page does."""

    def __init__(self, slot: LiveSlot, width: int, limits: ExposureLimits = ExposureLimits(),
                 every_s: float = RENDER_EVERY_S, clock=time.monotonic):
        self.slot, self.width, self.limits, self.every_s, self.clock = slot, width, limits, every_s, clock
        self._lock = threading.Lock()
        self._rendered: Rendered | None = None
        self._rendered_at = -math.inf
        self._focus: deque[float] = deque(maxlen=RECENT_FOCUS)

    def current(self) -> Rendered | None:
        """The latest frame drawn and judged, or the one drawn less than `every_s` ago; None before the first."""
        frame = self.slot.latest
        if frame is None:
            return None
        with self._lock:
            fresh = self._rendered is not None and self._rendered.frame is frame
            if not fresh and self.clock() - self._rendered_at >= self.every_s:
                self._rendered = Rendered(frame.index, draw(frame, self.width), self._judge(frame), frame)
                self._rendered_at = self.clock()
            return self._rendered

    def _judge(self, frame: LiveFrame) -> Indicators:
        brightness, clipped, exposure = exposure_of(frame.image, self.limits)
        focus = focus_of(frame.image, frame.um_per_pixel)
        in_focus = None
        if focus is not None:
            recent = statistics.median(self._focus) if self._focus else focus
            in_focus = focus >= DEFAULT_TRACK.min_focus and focus >= DEFAULT_TRACK.focus_ratio * recent
            self._focus.append(focus)
        return Indicators(focus, in_focus, brightness, clipped, exposure)


def live_status(rendered: Rendered | None) -> dict | None:
    """The live frame's part of /api/status."""
    if rendered is None:
        return None
    frame = rendered.frame
    return {"index": frame.index, "name": frame.name, "kind": frame.kind, "age_s": round(time.time() - frame.at, 1),
            "cells": sum(1 for b in frame.boxes if b.label), "found": len(frame.boxes),
            **rendered.indicators.to_dict()}
