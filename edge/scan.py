"""Scan mode: consecutive frames of one specimen, each white cell counted once in slide coordinates."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Iterator

from hematovision.errors import DataError, ImageUnreadable
from hematovision.pixels import read_rgb

from .count import CountRun
from .pipeline import FieldPipeline, FieldResult
from .track import BLURRED, MOVING, CountOnce, FrameResult, frame_focus

logger = logging.getLogger(__name__)


def scan_frame(pipeline: FieldPipeline, tracker: CountOnce, image) -> tuple[FieldResult, FrameResult | None]:
    """One frame: correct, segment, place it on the slide, classify only the cells new to the count."""
    image = pipeline.prepare(image)
    seg = pipeline.detect(image)
    if math.isnan(seg.um_per_pixel):
        return FieldResult(image.shape[1], image.shape[0], (), 0, seg.um_per_pixel, seg.pixel_size_source,
                           float("nan")), None
    placed = tracker.feed(image, seg, frame_focus(image, seg.um_per_pixel))
    cells = pipeline.classify(image, [n.detection for n in placed.new_cells], seg.um_per_pixel)
    for event in placed.events:
        logger.info("frame %d: %s", placed.index, event)
    return FieldResult(image.shape[1], image.shape[0], cells, len(seg.edge_cells), seg.um_per_pixel,
                       seg.pixel_size_source, float("nan")), placed


def record(run: CountRun, result: FieldResult, placed: FrameResult | None) -> None:
    """Add a scanned frame to the run: counted cells at their slide positions, skipped frames apart."""
    if placed is not None and placed.status == BLURRED:
        run.skipped_blur += 1
    elif placed is not None and placed.status == MOVING:
        run.skipped_motion += 1
    else:
        positions = [n.cell.position_um for n in placed.new_cells] if placed else []
        run.add(result, result.cells, positions)


def scan_frames(pipeline: FieldPipeline, paths: list[Path], run: CountRun,
                tracker: CountOnce | None = None) -> Iterator[tuple[Path, FieldResult]]:
    """Count frames in order as one specimen; yields each frame with the cells first counted in it."""
    tracker = tracker or CountOnce()
    for path in paths:
        try:
            result, placed = scan_frame(pipeline, tracker, read_rgb(path))
        except (ImageUnreadable, DataError) as err:
            logger.warning("skipped %s", err)
            run.skipped_files.append((str(path), str(err)))
            continue
        record(run, result, placed)
        yield path, result
