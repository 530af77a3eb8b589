"""The live view (edge/web/live.py): the frame loop's hand-over, the drawn frame, the focus and exposure verdicts,
and how often a frame is drawn however many ask. Real sample fields; no server."""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest

from hematovision.edge.web.live import (ExposureLimits, LiveBox, LiveFrame, LiveSlot, LiveView, draw, exposure_of,
                                        live_status)

FIELD = "BloodImage_00000.jpg"


@pytest.fixture
def field(samples_bccd) -> np.ndarray:
    image = cv2.imread(str(samples_bccd / "BCCD" / "JPEGImages" / FIELD))
    assert image is not None, FIELD
    return np.ascontiguousarray(image[:, :, ::-1])


def frame(index: int, image: np.ndarray, boxes=(), kind: str = "used") -> LiveFrame:
    return LiveFrame(index, f"frame-{index}", image, kind, tuple(boxes), 0.1, time.time())


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_slot_hands_over_the_very_frame_published_without_a_copy(field):
    slot = LiveSlot()
    assert slot.latest is None
    first = frame(1, field)
    slot.publish(first)
    assert slot.latest is first and slot.latest.image is field


def test_the_drawn_frame_is_scaled_down_never_up_and_each_box_is_drawn_where_the_cell_is(field):
    box = LiveBox((100, 100, 200, 180), "neutrophil")
    small = cv2.imdecode(np.frombuffer(draw(frame(1, field, [box]), 320), np.uint8), cv2.IMREAD_COLOR)
    assert small.shape[:2] == (240, 320)
    plain = cv2.imdecode(np.frombuffer(draw(frame(1, field), 320), np.uint8), cv2.IMREAD_COLOR)
    changed = np.abs(small.astype(int) - plain.astype(int)).sum(axis=2) > 60
    ys, xs = np.nonzero(changed[54:])  # the box at half scale, (50, 50) to (100, 90), give or take JPEG's blur ...
    assert abs(xs.min() - 50) <= 4 and abs(xs.max() - 100) <= 4 and abs(ys.max() + 54 - 90) <= 6
    assert changed[:50, 50:].any()  # ... and its class written above it
    full = cv2.imdecode(np.frombuffer(draw(frame(1, field), 4096), np.uint8), cv2.IMREAD_COLOR)
    assert full.shape[:2] == field.shape[:2]


def test_exposure_says_too_dark_too_bright_or_ok(field):
    limits = ExposureLimits()
    assert exposure_of(field, limits)[2] == "ok"
    assert exposure_of((field * 0.2).astype(np.uint8), limits)[2] == "too dark"
    bright = np.clip(field.astype(int) + 120, 0, 255).astype(np.uint8)
    mean, clipped, verdict = exposure_of(bright, limits)
    assert verdict == "too bright" and clipped > limits.max_clipped_fraction


def test_a_blurred_frame_after_sharp_ones_is_out_of_focus(field):
    slot, clock = LiveSlot(), Clock()
    view = LiveView(slot, 640, clock=clock)
    for i in range(3):
        slot.publish(frame(i, field))
        clock.now += 1
        assert view.current().indicators.in_focus is True
    slot.publish(frame(3, cv2.GaussianBlur(field, (0, 0), 6)))
    clock.now += 1
    rendered = view.current()
    assert rendered.indicators.in_focus is False
    status = live_status(rendered)
    assert (status["index"], status["name"], status["kind"], status["exposure"]) == (3, "frame-3", "used", "ok")


def test_a_frame_is_drawn_once_however_many_ask_and_at_most_every_half_second_however_fast_frames_come(field):
    slot, clock = LiveSlot(), Clock()
    view = LiveView(slot, 640, every_s=0.5, clock=clock)
    assert view.current() is None and live_status(None) is None
    slot.publish(frame(1, field))
    first = view.current()
    assert first.index == 1 and all(view.current() is first for _ in range(5))  # drawn once for every asker
    slot.publish(frame(2, field))
    clock.now += 0.2
    assert view.current() is first  # a newer frame, but the last was drawn 0.2 s ago
    clock.now += 0.3
    second = view.current()
    assert second.index == 2 and second.jpeg.startswith(b"\xff\xd8")
    slot.publish(frame(3, field, kind="blur"))
    clock.now += 10  # frames stopped coming: the last one is drawn when next asked
    assert view.current().index == 3 and live_status(view.current())["kind"] == "blur"
