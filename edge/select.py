"""Which detections of a frame are cells not counted before: every whole cell, or count-once in a scan."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from hematovision.errors import DataError

from .segment import Detection, Segmentation
from .track import BLURRED, COUNTED, CountOnce, frame_focus


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


class ScanSelector:
    """Overlapping frames of a panned slide: the count-once tracker (edge/track.py) says which
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
