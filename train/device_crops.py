"""Training crops centred where the device's own segmenter finds each annotated white cell."""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np

from hematovision.edge.vision.segment import DEFAULT_PARAMS, SegmentParams, segment
from hematovision.pixels import read_rgb

from .datasets import Dataset, Sample, Skipped, box_centred_on

logger = logging.getLogger(__name__)


def _inside(center, box) -> bool:
    return box[0] <= center[0] < box[2] and box[1] <= center[1] < box[3]


def device_box(sample: Sample, detections) -> tuple[int, int, int, int] | None:
    """The detection whose centre lies in the annotated box, nearest its centre, as a box of the
    detection's size centred (to half a pixel) where the device centres its crop: the nucleus
    centroid, not the middle of the cell box."""
    hits = [d for d in detections if _inside(d.center, sample.box)]
    if not hits:
        return None
    best = min(hits, key=lambda d: float(np.hypot(d.center[0] - sample.center[0], d.center[1] - sample.center[1])))
    return box_centred_on(best)


def recentre_on_segmenter(data: Dataset, params: SegmentParams = DEFAULT_PARAMS) -> Dataset:
    """Move each field sample to the segmenter's detection of its cell, so training sees the crops
    the device will cut; a cell the segmenter does not find is skipped and listed."""
    out = Dataset(skipped=list(data.skipped), sources=[f"{s} (segmenter centres)" for s in data.sources])
    found = {}
    for sample in data.samples:
        if sample.box is None:
            out.samples.append(sample)
            continue
        if sample.path not in found:
            found[sample.path] = segment(read_rgb(sample.path), params, sample.um_per_pixel).all_cells
        box = device_box(sample, found[sample.path])
        if box is None:
            out.skipped.append(Skipped(sample.path, f"the segmenter finds no white cell in box {sample.box}"))
        else:
            out.samples.append(replace(sample, box=box))
    logger.info("segmenter centres: %d cells kept, %d not found", len(out.samples),
                len(out.skipped) - len(data.skipped))
    return out
