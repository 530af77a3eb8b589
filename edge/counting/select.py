"""Which detections of a frame are cells not counted before: every whole cell, or count-once in a scan."""

from __future__ import annotations

import math

from hematovision.errors import DataError

from ..vision.pipeline import CellSelector, FieldSelector, Selection
from ..vision.segment import Segmentation
from .track import BLURRED, COUNTED, CountOnce, frame_focus


class ScanSelector:
    """Overlapping frames of a panned slide: the count-once tracker (edge/counting/track.py) says which
    whole cells are new and where they lie on the slide; blurred and moving frames count nothing.
    """

    def __init__(self, state: dict | None, keyframes: list[dict] | None = None):
        self.tracker = CountOnce.from_dict({**state, "keyframes": keyframes or []}) if state else CountOnce()
        self._keyframes_before = self.tracker.keyframes_added

    def select(self, image, seg: Segmentation) -> Selection:
        """Raises DataError for a frame the tracker cannot place (no pixel size, size changed)."""
        if math.isnan(seg.um_per_pixel):  # no pixel size measured yet
            raise DataError("no pixel size yet: the frame cannot be placed on the slide")
        self._keyframes_before = self.tracker.keyframes_added
        result = self.tracker.feed(image, seg, frame_focus(image, seg.um_per_pixel))
        kind = "used" if result.status == COUNTED else "blur" if result.status == BLURRED else "motion"
        return Selection(kind, tuple(n.detection for n in result.new_cells),
                         tuple(tuple(n.cell.position_um) for n in result.new_cells))

    def to_dict(self) -> dict | None:
        # Keyframes (about 10 kB each) are left out of the per-frame state: each is stored once,
        # when added (new_keyframes), and given back on restart, so a restarted scan relocalises
        # a jump exactly as an uninterrupted one.
        return self.tracker.to_dict(keyframes=False)

    def new_keyframes(self) -> tuple[tuple[int, dict], ...]:
        return self.tracker.keyframes_since(self._keyframes_before)


def make_selector(mode: str, state: dict | None, keyframes: list[dict] | None = None) -> CellSelector:
    """The selector of `counting.mode`, restored from its saved state and keyframes. Raises
    DataError for a saved tracker state that cannot be read.
    """
    return FieldSelector() if mode == "fields" else ScanSelector(state, keyframes)
