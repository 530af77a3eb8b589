"""Counting image files: every file its own field, or (scan) consecutive frames of one specimen."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Iterator

from hematovision.errors import DataError, ImageUnreadable
from hematovision.pixels import IMAGE_SUFFIXES, list_images, read_rgb

from ..vision.pipeline import CellResult, CellSelector, FieldPipeline, FieldResult
from .tally import Counter

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
    """The running state of one `count`: counted cells, the tally and what was skipped."""

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
            for cell, xy in zip(result.cells, result.slide_xy_um):
                self.cells.append(cell)
                self.slide_xy_um.append(xy)
                self.counter.add(cell.prediction.label)

    def summary(self) -> dict:
        return {**self.counter.tally().to_dict(), "fields": self.fields,
                "frames_skipped": {"blur": self.skipped_blur, "motion": self.skipped_motion},
                "cells_cut_by_edge": self.edge_cells,
                "pixel_size_source": sorted(self.pixel_sizes),
                "skipped_files": [{"path": p, "reason": r} for p, r in self.skipped_files]}


def count_frames(pipeline: FieldPipeline, paths: list[Path], run: CountRun,
                 selector: CellSelector, max_pixels: int | None = None) -> Iterator[tuple[Path, FieldResult]]:
    """Count image files in order; the selector decides which cells are new (every whole cell of a
    field, or count-once across the frames of a scan). Unreadable, unusable or oversized files are
    skipped and listed. Yields each file with the cells first counted in it."""
    for path in paths:
        try:
            result = pipeline.process(read_rgb(path, max_pixels), str(path), selector)
        except (ImageUnreadable, DataError) as err:
            logger.warning("skipped %s", err)
            run.skipped_files.append((str(path), str(err)))
            continue
        run.record(result)
        yield path, result
