"""Segmentation: find the white blood cells in a stained blood-smear field."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import cv2
import numpy as np

from hematovision.errors import CalibrationError, DataError

logger = logging.getLogger(__name__)

GIVEN = "given"
ESTIMATED = "estimated from red cells"


@dataclass(frozen=True)
class SegmentParams:
    """Thresholds and physical sizes of the segmenter; lengths in um, areas in um^2.

    The stain feature of a pixel is (B - G) + green_weight * (255 - G) after white balance:
    nuclei (haematoxylin/azure, purple to blue) absorb green and pass blue, red cells absorb
    green but also blue, and the background absorbs neither.
    """

    red_cell_diameter_um: float = 7.5  # median red-cell diameter, for the pixel-size estimate
    estimate_long_side_px: int = 192  # image long side at which red cells are measured
    min_red_cells: int = 5  # fewer red-cell peaks than this: no pixel-size estimate
    red_cell_min_radius_px: float = 2.0  # peaks below this (at estimate resolution) are noise
    red_cell_min_fraction: float = 0.3  # a darker Otsu class smaller than this is nuclei, not cells
    red_cell_threshold_fraction: float = 0.8  # cell threshold: this far from white to Otsu's
    red_cell_bridge_fraction: float = 0.5  # peaks below this * 90th percentile are bridges
    red_cell_size_correction: float = 1.11  # fitted: annotated red-cell boxes / measured
    work_um_per_pixel: float = 0.4  # internal working resolution (never upsampled)
    green_weight: float = 0.5  # weight of green absorption in the stain feature
    white_percentile: float = 97.0  # per-channel percentile taken as the white background
    stain_threshold: float = 130.0  # stain feature above which a pixel may be nucleus ...
    red_cell_percentile: float = 80.0  # ... and above this percentile of the field (red cells)
    nucleus_percentile: float = 99.5  # ... by this fraction of the way to this one (nuclei)
    stain_relative: float = 0.4
    stain_threshold_weak: float = 120.0  # a nucleus extends over pixels above these (hysteresis)
    stain_relative_weak: float = 0.2
    stain_above_red_cells: float = 90.0  # floors above lowered to this far above the red-cell
    stain_above_red_cells_weak: float = 70.0  # level where that is lower (pale stains)
    min_fragment_area_um2: float = 1.0  # smaller stained specks are dropped
    group_distance_um: float = 3.0  # nucleus fragments closer than this are one cell
    min_nucleus_area_um2: float = 14.0  # a white cell's nucleus is at least this big ...
    min_edge_nucleus_area_um2: float = 8.0  # ... or this, where the frame cuts the cell
    max_nucleus_area_um2: float = 450.0  # larger stained blobs are debris or clumps
    max_cell_diameter_um: float = 22.0  # groups wider than this are split ...
    max_nucleus_extent_um: float = 15.0  # ... into nuclei no wider than this
    platelet_area_um2: float = 6.0  # fragments smaller than this join a nucleus only ...
    platelet_gap_um: float = 1.0  # ... when closer than this (a platelet beside a cell stays out)
    split_core_fraction: float = 0.6  # watershed markers: distance > this * group maximum ...
    split_min_radius_um: float = 2.5  # ... in cores at least this thick (thinner ones are lobes)
    cell_margin_um: float = 1.5  # rim added around the nucleus box over stained (not background) pixels, at least ...
    max_cell_margin_um: float = 4.0  # ... and at most this far out to the measured cytoplasm edge
    cell_stain_absorption: float = 0.15  # stained: absorbs green this far from background to red cells
    cytoplasm_absorption: float = 0.3  # cytoplasm absorbs green this far from background to red cells ...
    cytoplasm_blue: float = 0.75  # ... and blue, relative to green, below this fraction of red cells' ...
    cytoplasm_pale: float = 0.5  # ... or, whatever its colour, less far than this (pale cytoplasm)
    cytoplasm_open_um: float = 1.0  # cytoplasm narrower than this (fringes, bridges) is dropped
    edge_margin_um: float = 0.5  # a cell box this close to the frame edge is cut by it
    focus_um_per_pixel: float = 0.25  # crops are resampled to this before the focus measure
    min_image_side_px: int = 32  # smaller frames are refused


DEFAULT_PARAMS = SegmentParams()


@dataclass(frozen=True)
class Detection:
    """One white cell: centre and box in full-resolution pixels, nucleus area in um^2."""

    center: tuple[float, float]
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (x1, y1 exclusive)
    area_um2: float
    focus: float  # variance of the Laplacian of the crop at a fixed pixel size, / mean^2
    touches_edge: bool


@dataclass(frozen=True)
class Segmentation:
    """The white cells of one field: `cells` are whole; `edge_cells` are cut by the frame."""

    cells: tuple[Detection, ...]
    edge_cells: tuple[Detection, ...]
    um_per_pixel: float
    pixel_size_source: str  # GIVEN or ESTIMATED

    @property
    def all_cells(self) -> tuple[Detection, ...]:
        """Whole and edge-cut cells together (for counting against annotated boxes)."""
        return self.cells + self.edge_cells


def check_field(image_rgb: np.ndarray, params: SegmentParams = DEFAULT_PARAMS) -> None:
    """Refuse what the segmenter cannot read.

    Raises DataError for an image that is not HxWx3 uint8 (a grayscale frame carries no stain
    colour: convert the camera to RGB) or is smaller than `params.min_image_side_px`.
    """
    image_rgb = np.asarray(image_rgb)
    if image_rgb.ndim == 2 or (image_rgb.ndim == 3 and image_rgb.shape[2] == 1):
        raise DataError("segment needs a colour (RGB) field: the nucleus is found by its stain colour, "
                        "and a grayscale frame has none; set the camera to RGB")
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
        raise DataError(f"segment needs an HxWx3 uint8 RGB image, got {image_rgb.shape} {image_rgb.dtype}")
    if min(image_rgb.shape[:2]) < params.min_image_side_px:
        raise DataError(f"field of {image_rgb.shape[1]}x{image_rgb.shape[0]} pixels is too small to segment; "
                        f"it needs at least {params.min_image_side_px} pixels a side")


def _resize(image: np.ndarray, scale: float) -> np.ndarray:
    """Resize by `scale` (area averaging when shrinking); scale 1 returns the image itself.

    A shrink by more than 2 averages whole k x k blocks first (OpenCV's fast integer path, about
    twice as fast as a fractional area resize of a 640x480 field) and interpolates the rest. An
    even k >= 4 is taken as 2 x 2 blocks (OpenCV's vectorised halving) then k/2 x k/2 blocks:
    the same averages up to rounding, in half the time of 6 x 6 blocks at once.
    """
    if abs(scale - 1.0) < 1e-3:
        return image
    h, w = image.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if scale > 1:
        return cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
    k = int(1.0 / scale)
    if k < 2 or min(h, w) < 2 * k:
        return cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    while k >= 4 and k % 2 == 0:
        image, k = _average_blocks(image, 2), k // 2
    return cv2.resize(_average_blocks(image, k), size, interpolation=cv2.INTER_LINEAR)


def _average_blocks(image: np.ndarray, k: int) -> np.ndarray:
    """Mean of each whole k x k block (the last rows and columns short of a block are dropped)."""
    h, w = image.shape[:2]
    return cv2.resize(image[: h - h % k, : w - w % k], (w // k, h // k), interpolation=cv2.INTER_AREA)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill the enclosed holes of a 0/255 mask (the pale centre of red cells)."""
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    filled = np.zeros_like(mask)
    cv2.drawContours(filled, contours, -1, 255, thickness=cv2.FILLED)
    return filled


def _transmission(gray: np.ndarray) -> np.ndarray:
    """Gray level divided by the local background (the bright envelope), as 0..255 uint8."""
    k = max(gray.shape) // 4 | 1
    background = cv2.blur(cv2.dilate(gray, cv2.getStructuringElement(cv2.MORPH_RECT, (k, k))), (k, k))
    ratio = gray.astype(np.float32) * 255.0 / np.maximum(background, 1).astype(np.float32)
    return cv2.GaussianBlur(np.clip(ratio, 0, 255).astype(np.uint8), (3, 3), 0)


def _otsu_below_background(values: np.ndarray, min_dark_fraction: float) -> float:
    """Otsu's threshold between cells and background, ignoring a small very dark class (nuclei)."""
    t, _ = cv2.threshold(values, 0, 255, cv2.THRESH_BINARY_INV | cv2.THRESH_OTSU)
    if (values <= t).mean() < min_dark_fraction:
        brighter = values[values > t].reshape(1, -1)
        t, _ = cv2.threshold(brighter, 0, 255, cv2.THRESH_BINARY_INV | cv2.THRESH_OTSU)
    return float(t)


def red_cell_mask(image_rgb: np.ndarray, params: SegmentParams = DEFAULT_PARAMS) -> tuple[np.ndarray, float]:
    """Mask (0/255) of the cells, pale centres filled, at a reduced scale; returns (mask, scale)."""
    scale = min(1.0, params.estimate_long_side_px / max(image_rgb.shape[:2]))
    trans = _transmission(_resize(np.ascontiguousarray(image_rgb[:, :, 1]), scale))
    t = _otsu_below_background(trans, params.red_cell_min_fraction)
    t = 255.0 - (255.0 - t) * params.red_cell_threshold_fraction
    cells = np.where(trans <= t, 255, 0).astype(np.uint8)
    cells = cv2.morphologyEx(cells, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3)))
    cells = cv2.morphologyEx(_fill_holes(cells), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    return cells, scale


def red_cell_diameter_px(image_rgb: np.ndarray, params: SegmentParams = DEFAULT_PARAMS) -> float:
    """Median diameter in full-resolution pixels of the red cells in a field.

    Cells (dark in green, against a flat-fielded background) are thresholded, their pale
    centres filled, and the distance transform's local maxima give one inscribed radius per
    cell, touching cells included; maxima on thin bridges between cells are dropped. White
    cells are few, so the median is the red cells'. Raises CalibrationError when fewer than
    `params.min_red_cells` cells are seen.
    """
    cells, scale = red_cell_mask(image_rgb, params)
    radii = _distance_peaks(cells, params.red_cell_min_radius_px)
    if radii.size:
        radii = radii[radii >= params.red_cell_bridge_fraction * np.percentile(radii, 90)]
    if radii.size < params.min_red_cells:
        raise CalibrationError(
            f"cannot estimate the pixel size: {radii.size} red cells found, {params.min_red_cells} needed; "
            "pass um_per_pixel from a calibration slide instead")
    return float(np.median(2.0 * radii + 1.0) * params.red_cell_size_correction / scale)


def _distance_peaks(mask: np.ndarray, min_radius: float) -> np.ndarray:
    """Values of the distance-transform local maxima of a mask, one per plateau."""
    dist = cv2.distanceTransform(mask, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    peaks = (dist >= cv2.dilate(dist, np.ones((5, 5), np.uint8))) & (dist >= min_radius)
    count, _, _, centroids = cv2.connectedComponentsWithStats(peaks.astype(np.uint8), connectivity=8)
    if count <= 1:
        return np.zeros(0)
    xy = np.round(centroids[1:]).astype(int)
    return dist[xy[:, 1], xy[:, 0]]


def estimate_um_per_pixel(image_rgb: np.ndarray, params: SegmentParams = DEFAULT_PARAMS) -> float:
    """Pixel size in um from the median red-cell diameter (`params.red_cell_diameter_um`).

    Raises CalibrationError when too few red cells are in view.
    """
    return params.red_cell_diameter_um / red_cell_diameter_px(image_rgb, params)


def segment(image_rgb: np.ndarray, params: SegmentParams = DEFAULT_PARAMS,
            um_per_pixel: float | None = None) -> Segmentation:
    """Find the white cells of an RGB uint8 field; boxes and centres in its pixels.

    With `um_per_pixel` None the pixel size is estimated from the red cells in view.
    Raises DataError for a frame that is not RGB uint8 or too small, and CalibrationError when
    the pixel size must be estimated and too few red cells are in view.
    """
    check_field(image_rgb, params)
    source = GIVEN
    if um_per_pixel is None:
        um_per_pixel, source = estimate_um_per_pixel(image_rgb, params), ESTIMATED
    elif not um_per_pixel > 0:
        raise DataError(f"pixel size must be positive, got {um_per_pixel} um per pixel")
    scale = min(1.0, um_per_pixel / params.work_um_per_pixel)
    work = _resize(image_rgb, scale)
    work_um = um_per_pixel / scale
    balanced = white_balance(work, params)  # once per field: the nucleus and cytoplasm maps both start from it
    nucleus = nucleus_mask(balanced, params, work_um)
    regions = _cell_regions(nucleus, params, work_um)
    cytoplasm = cytoplasm_mask(balanced, nucleus, params) if regions else None  # most scan frames hold no cell
    found = [_detection(image_rgb, cytoplasm, region, scale, um_per_pixel, params) for region in regions]
    found = [d for d in found if d is not None]
    logger.debug("%d white cells (%s um per pixel, %s)", len(found), um_per_pixel, source)
    return Segmentation(
        cells=tuple(d for d in found if not d.touches_edge),
        edge_cells=tuple(d for d in found if d.touches_edge),
        um_per_pixel=float(um_per_pixel), pixel_size_source=source,
    )


@dataclass(frozen=True)
class WhiteBalanced:
    """A field's green and blue channels (float32), each scaled so that its white background is 255."""

    green: np.ndarray
    blue: np.ndarray


def white_balance(image_rgb: np.ndarray, params: SegmentParams = DEFAULT_PARAMS) -> WhiteBalanced:
    """The green and blue channels of an RGB uint8 field, white-balanced on their `white_percentile`."""
    green, blue = (_balanced_channel(image_rgb[:, :, c], params) for c in (1, 2))
    return WhiteBalanced(green, blue)


def _balanced_channel(channel: np.ndarray, params: SegmentParams) -> np.ndarray:
    white = _percentile_u8(channel, params.white_percentile)
    return channel.astype(np.float32) * (255.0 / max(white, 1.0))


def stain_feature(balanced: WhiteBalanced, params: SegmentParams = DEFAULT_PARAMS) -> np.ndarray:
    """Nucleus-stain strength per pixel (float32): (B - G) + w * (255 - G) after white balance."""
    green, blue = balanced.green, balanced.blue
    return (blue - green) + params.green_weight * (255.0 - green)


def _percentile_u8(channel: np.ndarray, q: float) -> float:
    """The q-th percentile (lower value) of a uint8 channel, from its histogram."""
    counts = cv2.calcHist([np.ascontiguousarray(channel)], [0], None, [256], [0, 256]).ravel()
    return float(np.searchsorted(np.cumsum(counts), q / 100.0 * channel.size))


STAINED = 1  # cytoplasm_mask value: absorbs clearly more than the background
CYTOPLASM = 2  # cytoplasm_mask value: may be white-cell cytoplasm (also stained)


def cytoplasm_mask(balanced: WhiteBalanced, nucleus: np.ndarray, params: SegmentParams = DEFAULT_PARAMS) -> np.ndarray:
    """Map (uint8) of the pixels around white cells: CYTOPLASM where a pixel may be white-cell
    cytoplasm, else STAINED where it absorbs green more than the background
    (`cell_stain_absorption` of the way to red cells), else 0.

    Cytoplasm absorbs green clearly more than the background (`cytoplasm_absorption` of the way
    to red cells) but blue less, relative to green, than red cells do (haemoglobin and eosin
    absorb blue; the pale pink-to-blue cytoplasm hardly does), or it is pale: less than
    `cytoplasm_pale` of the way (pale monocyte and neutrophil cytoplasm whose colour is the red
    cells'; thin fringes of red cells are opened away in `_cell_box`). The ratio of blue to green
    absorption is a colour, the same in a red cell's thick rim, its pale centre and its blurred
    edge. Levels are the field's own: Otsu's split of green absorption outside the `nucleus`
    mask (`nucleus_mask`; a large nucleus would otherwise make the darker class) into background
    and cells, mostly red cells, gives the background and red-cell absorption and the red cells'
    ratio (of the medians). `balanced` is the field's `white_balance`."""
    green, blue = balanced.green, balanced.blue
    absorb_g = np.clip(255.0 - green, 0, 255).astype(np.uint8)
    absorb_b = 255.0 - blue
    outside = nucleus == 0
    out = np.zeros(absorb_g.shape, np.uint8)
    if not outside.any():
        return out
    t, _ = cv2.threshold(absorb_g[outside].reshape(1, -1), 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
    cells = (absorb_g > t) & outside
    if not cells.any() or cells.all():
        return out
    background, red = _median(absorb_g[~cells]), _median(absorb_g[cells])
    red_ratio = _median(absorb_b[cells]) / max(red, 1.0)
    span = max(red - background, 1.0)  # levels below: fractions of the way from background to red cells
    out[absorb_g > background + params.cell_stain_absorption * span] = STAINED
    out[(absorb_g > background + params.cytoplasm_absorption * span) & (
        (absorb_b < params.cytoplasm_blue * red_ratio * absorb_g)
        | (absorb_g < background + params.cytoplasm_pale * span))] = CYTOPLASM
    return out


def _median(values: np.ndarray) -> float:
    """np.median of a non-empty array, by `_percentiles`."""
    return _percentiles(values, (50.0,))[0]


def nucleus_mask(balanced: WhiteBalanced, params: SegmentParams, um_per_pixel: float) -> np.ndarray:
    """Mask (0/255) of nucleus-stained pixels of a `white_balance`d field: weakly stained regions
    holding a strong seed."""
    feature = stain_feature(balanced, params)
    strong, weak = _stain_thresholds(feature, params)
    mask = np.where(feature > weak, 255, 0).astype(np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((2, 2), np.uint8))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    keep = np.zeros(count, dtype=bool)
    keep[labels[feature > strong]] = True
    keep[stats[:, cv2.CC_STAT_AREA] < params.min_fragment_area_um2 / um_per_pixel**2] = False
    keep[0] = False
    return np.where(keep[labels], 255, 0).astype(np.uint8)


def _stain_thresholds(feature: np.ndarray, params: SegmentParams) -> tuple[float, float]:
    """(strong, weak) stain thresholds: the higher of a floor and a fraction of the way from the
    field's red-cell level to its nucleus level. The floor is the absolute threshold, or a fixed
    step above the red-cell level where that is lower (pale stains, where nuclei never reach
    the absolute threshold)."""
    level, top = _percentiles(feature[:: 2, :: 2], (params.red_cell_percentile, params.nucleus_percentile))
    span = top - level
    strong = max(min(params.stain_threshold, level + params.stain_above_red_cells), level + params.stain_relative * span)
    weak = max(min(params.stain_threshold_weak, level + params.stain_above_red_cells_weak),
               level + params.stain_relative_weak * span)
    return strong, min(weak, strong)


def _percentiles(values: np.ndarray, qs) -> list[float]:
    """np.percentile's default (linear) percentiles by one partial sort: a tenth of its time on
    a field's few thousand values, where np.percentile's set-up costs more than the sort."""
    flat = values.ravel()
    at = [q / 100.0 * (flat.size - 1) for q in qs]
    below = [int(math.floor(a)) for a in at]
    above = [min(b + 1, flat.size - 1) for b in below]
    part = np.partition(flat, sorted(set(below + above)))
    return [float(part[b]) + (float(part[c]) - float(part[b])) * (a - b) for a, b, c in zip(at, below, above)]


@dataclass(frozen=True)
class _Region:
    """One candidate cell at working resolution: its nucleus pixels inside a box."""

    x0: int
    y0: int
    nucleus: np.ndarray  # bool, the nucleus pixels of this cell within its box


def _disc(radius_px: float) -> np.ndarray:
    size = 2 * max(1, int(round(radius_px))) + 1
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))


def _cell_regions(nucleus: np.ndarray, params: SegmentParams, um_per_pixel: float) -> list[_Region]:
    """Group nucleus fragments closer than `group_distance_um` into cells no wider than
    `max_nucleus_extent_um`, and split oversized single fragments at their necks."""
    grouped = cv2.dilate(nucleus, _disc(params.group_distance_um / 2 / um_per_pixel))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(grouped, connectivity=8)
    max_px = params.max_cell_diameter_um / um_per_pixel
    regions = []
    for i in range(1, count):
        x, y, w, h = stats[i, :4]
        group = labels[y:y + h, x:x + w] == i
        inside = group & (nucleus[y:y + h, x:x + w] > 0)
        limit = params.max_nucleus_extent_um / um_per_pixel if max(w, h) > max_px else math.inf
        for cluster in _cluster_fragments(inside, params, um_per_pixel, limit):
            parts = _split(cluster, cluster, params, um_per_pixel) if _extent(cluster) > max_px else [cluster]
            regions += [_Region(int(x), int(y), cluster & part) for part in parts]
    return regions


def _extent(mask: np.ndarray) -> int:
    """The longer side in pixels of the bounding box of a mask's pixels."""
    x, y, w, h = cv2.boundingRect(mask.astype(np.uint8))
    return max(w, h)


def _cluster_fragments(nucleus: np.ndarray, params: SegmentParams, um_per_pixel: float,
                       limit: float) -> list[np.ndarray]:
    """Join the nucleus fragments of a group, nearest gaps first, into clusters no wider than
    `limit` pixels (the lobes of one cell join; the nuclei of two touching cells do not).

    Fragments smaller than `platelet_area_um2` join only across gaps up to `platelet_gap_um`,
    so a platelet lying beside a cell neither widens its box nor adds to its nucleus.
    """
    count, labels = cv2.connectedComponents(nucleus.astype(np.uint8), connectivity=8)
    fragments = [labels == k for k in range(1, count)]
    if len(fragments) < 2:
        return fragments
    gaps = _fragment_gaps(fragments)
    small = np.array([f.sum() for f in fragments]) < params.platelet_area_um2 / um_per_pixel**2
    gaps[(small[:, None] | small[None, :]) & (gaps > params.platelet_gap_um / um_per_pixel)] = np.inf
    # the gap that the grouping dilation bridges (two discs of the same rounded radius)
    max_gap = 2 * max(1, round(params.group_distance_um / 2 / um_per_pixel)) + 1
    return _join_nearest(fragments, gaps, max_gap, limit)


def _join_nearest(fragments: list[np.ndarray], gaps: np.ndarray, max_gap: float, limit: float) -> list[np.ndarray]:
    """Single-linkage joining of fragments across gaps up to `max_gap`, nearest first, skipping
    any join that would make a cluster wider than `limit` pixels."""
    clusters = list(fragments)
    owner = list(range(len(fragments)))
    pairs = sorted((gaps[a, b], a, b) for a in range(len(fragments)) for b in range(a + 1, len(fragments)))
    for gap, a, b in pairs:
        if gap > max_gap:
            break
        ra, rb = owner[a], owner[b]
        if ra != rb and _extent(clusters[ra] | clusters[rb]) <= limit:
            clusters[ra] = clusters[ra] | clusters[rb]
            owner = [ra if o == rb else o for o in owner]
    return [clusters[k] for k in sorted(set(owner))]


def _fragment_gaps(fragments: list[np.ndarray]) -> np.ndarray:
    """Matrix of the shortest pixel distances between fragments."""
    n = len(fragments)
    gaps = np.zeros((n, n), np.float32)
    for a in range(n):
        dist = cv2.distanceTransform((~fragments[a]).astype(np.uint8), cv2.DIST_L2, 3)
        for b in range(n):
            if b != a:
                gaps[a, b] = dist[fragments[b]].min()
    return np.minimum(gaps, gaps.T)


def _split(group: np.ndarray, nucleus: np.ndarray, params: SegmentParams, um_per_pixel: float) -> list[np.ndarray]:
    """Split a group of touching cells at the necks of its nuclei (a watershed on distance).

    Markers are the cores where the distance to the nucleus edge exceeds
    `split_core_fraction` of its maximum, and only cores as thick as a whole nucleus
    (`split_min_radius_um`), so the thin lobes of one neutrophil never become markers;
    each pixel of the group goes to the nearest marker.
    """
    padded = np.pad(nucleus, 1).astype(np.uint8)
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    count, core_labels = cv2.connectedComponents((dist > params.split_core_fraction * dist.max()).astype(np.uint8))
    peak = np.zeros(count, np.float32)
    np.maximum.at(peak, core_labels.ravel(), dist.ravel())
    thick = np.flatnonzero(peak >= params.split_min_radius_um / um_per_pixel)
    thick = thick[thick > 0]
    if thick.size < 2:
        return [group]
    core_labels = np.where(np.isin(core_labels, thick), core_labels, 0)
    cores = (core_labels > 0).astype(np.uint8)
    _, nearest = cv2.distanceTransformWithLabels(1 - cores, cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_CCOMP)
    lookup = np.zeros(nearest.max() + 1, dtype=np.int32)
    lookup[nearest[cores > 0]] = core_labels[cores > 0]
    owner = lookup[nearest][1:-1, 1:-1]
    return [group & (owner == k) for k in thick]


def _cell_box(cytoplasm: np.ndarray, region: _Region, params: SegmentParams,
              um_per_pixel: float) -> tuple[float, float, float, float]:
    """Box (x0, y0, x1, y1, working pixels) of a nucleus and the cytoplasm around it.

    `cytoplasm` is `cytoplasm_mask`'s map. The box holds the nucleus, its stained rim (pixels
    not background within `cell_margin_um`: cytoplasm too pale or too red to be told apart;
    none where the background comes up to the nucleus, as around many lymphocytes) and the
    CYTOPLASM pixels within `max_cell_margin_um` that, opened by a `cytoplasm_open_um` disc,
    still touch it (through each other; a platelet across background stays out).
    """
    ys, xs = np.nonzero(region.nucleus)
    ys, xs = ys + region.y0, xs + region.x0
    rim, reach = params.cell_margin_um / um_per_pixel, params.max_cell_margin_um / um_per_pixel
    pad = int(math.ceil(max(rim, reach))) + 1
    h, w = cytoplasm.shape
    wx0, wy0 = max(0, xs.min() - pad), max(0, ys.min() - pad)
    wx1, wy1 = min(w, xs.max() + 1 + pad), min(h, ys.max() + 1 + pad)
    nucleus = np.zeros((wy1 - wy0, wx1 - wx0), np.uint8)
    nucleus[ys - wy0, xs - wx0] = 1
    dist = cv2.distanceTransform(1 - nucleus, cv2.DIST_L2, 3)
    around = cytoplasm[wy0:wy1, wx0:wx1]
    cell = ((around == CYTOPLASM) & (dist <= reach)).astype(np.uint8)
    cell = cv2.morphologyEx(cell, cv2.MORPH_OPEN, _disc(params.cytoplasm_open_um / 2 / um_per_pixel))
    cell |= ((around > 0) & (dist <= rim)) | nucleus
    _, labels, stats, _ = cv2.connectedComponentsWithStats(cell, connectivity=8)
    touching = np.zeros(len(stats), bool)
    touching[labels[nucleus > 0]] = True
    parts = stats[touching]  # the components holding the nucleus
    x0, y0 = parts[:, cv2.CC_STAT_LEFT].min(), parts[:, cv2.CC_STAT_TOP].min()
    x1 = (parts[:, cv2.CC_STAT_LEFT] + parts[:, cv2.CC_STAT_WIDTH]).max()
    y1 = (parts[:, cv2.CC_STAT_TOP] + parts[:, cv2.CC_STAT_HEIGHT]).max()
    return (wx0 + x0, wy0 + y0, wx0 + x1, wy0 + y1)


def _detection(image_rgb: np.ndarray, cytoplasm: np.ndarray, region: _Region, scale: float,
               um_per_pixel: float, params: SegmentParams) -> Detection | None:
    """A Detection in full-resolution pixels, or None when the region is not a white cell."""
    work_um = um_per_pixel / scale
    area_um2 = float(region.nucleus.sum()) * work_um**2
    if not area_um2 or area_um2 > params.max_nucleus_area_um2:
        return None
    ys, xs = np.nonzero(region.nucleus)
    h, w = image_rgb.shape[:2]
    raw = tuple(v / scale for v in _cell_box(cytoplasm, region, params, work_um))
    edge = params.edge_margin_um / um_per_pixel
    touches = raw[0] < edge or raw[1] < edge or raw[2] > w - edge or raw[3] > h - edge
    if area_um2 < (params.min_edge_nucleus_area_um2 if touches else params.min_nucleus_area_um2):
        return None
    bbox = (max(0, int(raw[0])), max(0, int(raw[1])), min(w, int(math.ceil(raw[2]))), min(h, int(math.ceil(raw[3]))))
    center = ((region.x0 + xs.mean() + 0.5) / scale - 0.5, (region.y0 + ys.mean() + 0.5) / scale - 0.5)
    return Detection(center=(float(center[0]), float(center[1])), bbox=bbox, area_um2=area_um2,
                     focus=focus_measure(image_rgb, bbox, um_per_pixel, params), touches_edge=bool(touches))


def focus_measure(image_rgb: np.ndarray, bbox: tuple[int, int, int, int], um_per_pixel: float,
                  params: SegmentParams = DEFAULT_PARAMS) -> float:
    """Variance of the Laplacian of a crop resampled to `params.focus_um_per_pixel`, / mean^2.

    Resampling to one pixel size and dividing by the squared mean brightness makes the figure
    comparable across magnifications and exposures; larger is sharper.
    """
    x0, y0, x1, y1 = bbox
    gray = cv2.cvtColor(image_rgb[y0:y1, x0:x1], cv2.COLOR_RGB2GRAY)
    gray = _resize(gray, um_per_pixel / params.focus_um_per_pixel).astype(np.float32)
    mean = float(gray.mean())
    if gray.size < 9 or mean <= 0:
        return 0.0
    return float(cv2.Laplacian(gray, cv2.CV_32F).var() / mean**2)
