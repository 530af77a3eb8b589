"""Counting image files: every file its own field, or (scan) consecutive frames of one specimen."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Iterator

from hematovision.errors import DataError, ImageUnreadable
from hematovision.pixels import IMAGE_SUFFIXES, list_images, read_rgb

from ..config import ChecksConfig
from ..vision.pipeline import CellResult, CellSelector, FieldPipeline, FieldResult
from .checks import ColourSums, Evidence, Flag, TrainingRange, specimen_flags
from .tally import Counter, absolute_count

logger = logging.getLogger(__name__)


def expand_inputs(inputs: list[str | Path]) -> list[Path]:
    """Files as given, folders as their images in name order.

    Raises DataError for a missing path or a folder with no images.
    """
    out = []
    for item in map(Path, inputs):
        if item.is_dir():
            images = list_images(item)
            if not images:
                raise DataError(f"{item}: folder has no images ({', '.join(IMAGE_SUFFIXES)})")
            out += images
        elif item.exists():
            out.append(item)
        else:
            raise DataError(f"{item}: no such file or folder")
    return out


@dataclass
class CountRun:
    """The running state of one `count`: counted cells, the tally, what was skipped, and when the target
    was reached. With `stop_at_target` counting stops after the field that reaches it, as the daemon
    finishes a specimen; the white count (10^9/L), when given, adds absolute counts per class. The
    evidence the specimen checks judge is gathered too, against the bundle's training range (`training`)
    with `limits`."""

    counter: Counter
    cells: list[CellResult] = field(default_factory=list)
    skipped_files: list[tuple[str, str]] = field(default_factory=list)
    slide_xy_um: list[tuple[float, float]] = field(default_factory=list)
    fields: int = 0
    skipped_blur: int = 0
    skipped_motion: int = 0
    edge_cells: int = 0
    pixel_sizes: set = field(default_factory=set)
    started_at: str = field(default_factory=lambda: datetime.now().astimezone().isoformat(timespec="seconds"))
    stop_at_target: bool = False
    wbc_10e9_per_l: float | None = None
    reached_after: tuple[int, int] | None = None  # (fields, identified cells) when the target was reached
    inputs_not_counted: int = 0
    training: TrainingRange = TrainingRange()
    limits: ChecksConfig = ChecksConfig()
    unfamiliar: int = 0
    colour: ColourSums = ColourSums()
    um_per_pixel: float | None = None  # of the latest used frame

    def record(self, result: FieldResult) -> None:
        """Count a frame's new cells at their slide positions, or count the frame as skipped."""
        if result.kind == "blur":
            self.skipped_blur += 1
        elif result.kind == "motion":
            self.skipped_motion += 1
        else:
            self.fields += 1
            self.edge_cells += result.edge_cells
            self.pixel_sizes.add(result.pixel_size_source)
            self.colour = self.colour.add(result.colour) if result.colour is not None else self.colour
            self.um_per_pixel = result.um_per_pixel if result.um_per_pixel > 0 else self.um_per_pixel
            for cell, xy in zip(result.cells, result.slide_xy_um):
                self.add_cell(cell, xy)
        if self.reached_after is None and self.counter.identified >= self.counter.target:
            self.reached_after = (self.fields, self.counter.identified)

    def add_cell(self, cell: CellResult, slide_xy_um: tuple[float, float]) -> None:
        self.cells.append(cell)
        self.slide_xy_um.append(slide_xy_um)
        self.counter.add(cell.prediction.label)
        self.unfamiliar += cell.prediction.unfamiliar

    @property
    def done(self) -> bool:
        """True once the target is reached and counting is to stop there."""
        return self.stop_at_target and self.reached_after is not None

    def evidence(self) -> Evidence:
        return Evidence(self.counter.tally(), len(self.cells), self.unfamiliar, self.fields, self.skipped_blur,
                        self.skipped_motion, self.colour, self.um_per_pixel)

    def flags(self) -> tuple[Flag, ...]:
        """What is wrong with the specimen so far, worst first (edge/counting/checks.py)."""
        return specimen_flags(self.evidence(), self.training, self.limits)

    def summary(self) -> dict:
        tally = self.counter.tally().to_dict()
        reached = None if self.reached_after is None else \
            {"fields": self.reached_after[0], "identified": self.reached_after[1]}
        out = {**tally, "fields": self.fields, "target_reached_after": reached,
               "inputs_not_counted": self.inputs_not_counted,
               "frames_skipped": {"blur": self.skipped_blur, "motion": self.skipped_motion},
               "cells_cut_by_edge": self.edge_cells,
               "pixel_size_source": sorted(self.pixel_sizes),
               "skipped_files": [{"path": p, "reason": r} for p, r in self.skipped_files],
               "unfamiliar": self.unfamiliar, "flags": [f.to_dict() for f in self.flags()]}
        if self.wbc_10e9_per_l is not None:
            out["wbc_10e9_per_l"] = self.wbc_10e9_per_l
            for c in out["classes"]:
                c["absolute_10e9_per_l"] = round(absolute_count(c["percent"], self.wbc_10e9_per_l), 3)
        return out


def count_frames(pipeline: FieldPipeline, paths: list[Path], run: CountRun,
                 selector: CellSelector, max_pixels: int | None = None) -> Iterator[tuple[Path, FieldResult | None]]:
    """Count image files in order; the selector decides which cells are new (every whole cell of a
    field, or count-once across the frames of a scan). Unreadable, unusable or oversized files are
    skipped and listed. Yields each file with the cells first counted in it (None when skipped); once
    `run.done` (the target reached, stopping there) the rest are only counted in `run.inputs_not_counted`."""
    for i, path in enumerate(paths):
        if run.done:
            run.inputs_not_counted = len(paths) - i
            return
        try:
            result = pipeline.process(read_rgb(path, max_pixels), str(path), selector)
        except (ImageUnreadable, DataError) as err:
            logger.warning("skipped %s", err)
            run.skipped_files.append((str(path), str(err)))
            yield path, None
            continue
        run.record(result)
        yield path, result
