"""Count-once tracking on simulated pans over the sample fields: registration, skips, jumps, restarts."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest

from hematovision.edge.counting import scansim
from hematovision.edge.counting.register import prepare, register
from hematovision.edge.vision.segment import Segmentation, segment
from hematovision.edge.counting.track import (BLURRED, COUNTED, JUMP, MOVING, NEW_MAP, RELOCALISED, CountOnce,
                                     frame_focus)
from hematovision.errors import DataError
from hematovision.pixels import read_rgb

UM = scansim.BCCD_UM_PER_PIXEL


@dataclass
class Scan:
    slide: scansim.Slide
    frames: list  # SimFrame
    segmentations: list  # Segmentation per frame
    focus: list  # frame focus per frame


def simulate(samples_bccd, **settings) -> Scan:
    settings = scansim.ScanSettings(**{"columns": 4, "rows": 2, **settings})
    slide = scansim.build_slide(scansim.field_paths(samples_bccd, settings.columns * settings.rows), settings)
    frames = list(scansim.scan(slide, settings))
    return Scan(slide, frames, [segment(f.image, um_per_pixel=UM) for f in frames],
                [frame_focus(f.image, UM) for f in frames])


def feed(tracker: CountOnce, scan: Scan, frames: range | None = None) -> list:
    """Feed (part of) a scan; returns [(frame, FrameResult)]."""
    indices = frames if frames is not None else range(len(scan.frames))
    return [(scan.frames[i], tracker.feed(scan.frames[i].image, scan.segmentations[i], scan.focus[i]))
            for i in indices]


def score(scan: Scan, fed: list) -> scansim.ScanScore:
    counted = [(frame.origin, new.detection.center) for frame, result in fed for new in result.new_cells]
    return scansim.score(scan.slide, scan.frames, counted)


@pytest.fixture(scope="module")
def pan(samples_bccd) -> Scan:
    """A serpentine with defocused frames and fast smeared steps, no jumps."""
    return simulate(samples_bccd, detours=0, seed=2, defocus_fraction=0.1, fast_fraction=0.08)


@pytest.fixture(scope="module")
def detour(samples_bccd) -> Scan:
    """A pan with two detours: jumps away, some pan steps there, jumps back."""
    return simulate(samples_bccd, detours=2, seed=5)


def test_registration_recovers_a_known_shift_on_a_real_field_within_a_pixel(samples_bccd):
    image = read_rgb(samples_bccd / "BCCD" / "JPEGImages" / "BloodImage_00000.jpg")
    dx, dy = 57, -23
    reference = prepare(np.ascontiguousarray(image[40:440, 80:560]), UM)
    moved = prepare(np.ascontiguousarray(image[40 + dy:440 + dy, 80 + dx:560 + dx]), UM)
    reg = register(reference, moved)
    assert reg.ok, reg.reason
    assert np.hypot(reg.shift_px[0] - dx, reg.shift_px[1] - dy) < 1.0
    assert reg.shift_um == pytest.approx((reg.shift_px[0] * UM, reg.shift_px[1] * UM), rel=0.01)


def test_registration_refuses_frames_that_share_nothing(samples_bccd):
    images = [read_rgb(samples_bccd / "BCCD" / "JPEGImages" / f"BloodImage_0000{n}.jpg") for n in (0, 1)]
    reg = register(prepare(images[0], UM), prepare(images[1], UM))
    assert not reg.ok and reg.reason


def test_a_pan_counts_each_cell_in_view_exactly_once(pan):
    tracker = CountOnce()
    result = score(pan, feed(tracker, pan))
    assert result.in_view >= 3
    assert result.doubles == 0
    assert result.matched >= 0.98 * result.in_view
    assert result.false_positives == 0
    assert tracker.counters.cells == len(tracker.cells) == result.counted


def test_blurred_frames_are_skipped_and_counted_as_skipped(pan):
    tracker = CountOnce()
    fed = feed(tracker, pan)
    blurred = [result.status for frame, result in fed if frame.blurred]
    assert blurred and all(status in (BLURRED, MOVING) for status in blurred)
    assert all(not result.new_cells for _, result in fed if result.status != COUNTED)
    counters = tracker.counters
    assert counters.skipped_blur == sum(r.status == BLURRED for _, r in fed) > 0
    assert counters.skipped_motion == sum(r.status == MOVING for _, r in fed)
    assert counters.frames == len(fed) == counters.counted_frames + counters.skipped_blur + counters.skipped_motion


def test_a_jump_is_reported_and_counts_no_cell_twice(detour):
    tracker = CountOnce()
    fed = feed(tracker, detour)
    events = [e for _, result in fed for e in result.events]
    assert JUMP in events and tracker.counters.jumps == events.count(JUMP)
    assert tracker.counters.relocalised + tracker.counters.new_maps >= tracker.counters.jumps - 1
    assert RELOCALISED in events or NEW_MAP in events
    result = score(detour, fed)
    assert result.doubles == 0
    assert result.matched >= 0.98 * result.in_view


def test_a_frame_from_an_unseen_place_starts_a_new_map_and_known_cells_are_recognised(pan):
    """Frames fed out of order: the second half first, then (a jump) the whole pan from the start."""
    tracker = CountOnce()
    half = len(pan.frames) // 2
    fed = feed(tracker, pan, range(half, len(pan.frames))) + feed(tracker, pan)
    assert tracker.counters.jumps >= 1
    assert tracker.counters.new_maps >= 1 or tracker.counters.relocalised >= 1
    assert score(pan, fed).doubles == 0


def test_state_round_trips_and_resuming_mid_scan_gives_the_same_count(detour):
    whole = CountOnce()
    feed(whole, detour)
    first = CountOnce()
    half = len(detour.frames) // 2
    feed(first, detour, range(half))
    state = json.loads(json.dumps(first.to_dict()))
    resumed = CountOnce.from_dict(state)
    assert resumed.to_dict() == state
    feed(resumed, detour, range(half, len(detour.frames)))
    assert len(resumed.cells) == len(whole.cells)
    positions = lambda tracker: np.array([c.position_um for c in tracker.cells]).ravel()
    assert positions(resumed) == pytest.approx(positions(whole), abs=0.5)
    assert resumed.counters == whole.counters


def test_state_with_keyframes_round_trips(detour):
    tracker = CountOnce()
    feed(tracker, detour, range(20))
    state = tracker.to_dict(keyframes=True)
    assert state["keyframes"]
    assert CountOnce.from_dict(json.loads(json.dumps(state))).to_dict(keyframes=True) == state


def test_a_damaged_state_is_refused_with_what_to_do():
    with pytest.raises(DataError, match="start a new scan"):
        CountOnce.from_dict({"format": "something else"})
    state = CountOnce().to_dict()
    del state["cells"]
    with pytest.raises(DataError, match="start a new scan"):
        CountOnce.from_dict(state)


def test_a_frame_of_another_size_mid_scan_is_refused(pan):
    tracker = CountOnce()
    feed(tracker, pan, range(2))
    small = np.ascontiguousarray(pan.frames[2].image[:240, :320])
    with pytest.raises(DataError, match="resolution"):
        tracker.feed(small, Segmentation((), (), UM, "given"), 1.0)
