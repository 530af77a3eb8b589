"""Scan simulator: a camera window panned over a mosaic of annotated fields, with ground truth."""

from __future__ import annotations

import json
import logging
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from hematovision.errors import DataError
from hematovision.pixels import read_rgb

from .register import RegisterParams, prepare, register

logger = logging.getLogger(__name__)

BCCD_UM_PER_PIXEL = 0.072  # 7.5 um over the median annotated red-cell box (about 104 px) in BCCD
STEP, FAST, JUMP, START = "step", "fast", "jump", "start"
SAME_PLACE = RegisterParams(min_response=0.1, min_agreement=0.7)  # two fields registering like this overlap


@dataclass(frozen=True)
class ScanSettings:
    """Mosaic and camera path; lengths in pixels of the source fields (the camera's pixels)."""

    columns: int = 4  # fields across the mosaic ...
    rows: int = 3  # ... and down
    seam_px: int = 40  # neighbouring fields overlap and cross-fade over this width
    white: float = 235.0  # each field's background is balanced to this gray level
    frame_size: tuple[int, int] = (640, 480)  # camera window, width x height
    step_px: tuple[int, int] = (60, 150)  # range of one pan step along a row
    row_step_px: int = 180  # distance between rows of the serpentine, made in two steps
    wobble_px: int = 4  # random sideways drift per step
    noise_sigma: float = 3.0  # camera noise, gray levels
    defocus_fraction: float = 0.06  # frames defocused ...
    defocus_sigma_px: tuple[float, float] = (3.0, 6.0)  # ... by a Gaussian of this width
    fast_fraction: float = 0.05  # steps made fast ...
    fast_step_px: tuple[int, int] = (200, 280)  # ... this long ...
    motion_blur_fraction: float = 0.12  # ... and smeared over this fraction of their length
    detours: int = 2  # jumps away from the path, each followed by a jump back
    detour_steps: int = 4  # pan steps during a detour
    um_per_pixel: float = BCCD_UM_PER_PIXEL
    seed: int = 0


@dataclass(frozen=True)
class TruthCell:
    """An annotated white cell on the slide; `whole` is False where a field edge or seam cuts it."""

    id: int
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in slide pixels
    whole: bool
    field: str


@dataclass(frozen=True, eq=False)
class Slide:
    """The mosaic image (RGB uint8) and its annotated white cells."""

    image: np.ndarray
    cells: tuple[TruthCell, ...]
    um_per_pixel: float


@dataclass(frozen=True, eq=False)
class SimFrame:
    """One camera frame and its truth: where the window was, whether it is blurred, which
    whole annotated cells lie fully inside it."""

    index: int
    image: np.ndarray
    origin: tuple[int, int]  # slide pixel at the frame's top-left corner
    kind: str  # START, STEP, FAST or JUMP: how the window got here
    blurred: bool
    visible: tuple[int, ...]  # ids of whole truth cells fully in view


def field_paths(root: Path, count: int, skip: int = 0) -> list[tuple[Path, Path]]:
    """(image, VOC annotation) of `count` fields under root/BCCD that hold a white cell and show
    no part of each other, in name order after the first `skip` such fields.

    BCCD re-photographs some places in shifted fields; a mosaic holding both would show one
    place twice, which no slide does. Raises DataError when too few fields are found.
    """
    ann_dir, img_dir = Path(root) / "BCCD" / "Annotations", Path(root) / "BCCD" / "JPEGImages"
    pairs = [(img_dir / (xml.stem + ".jpg"), xml) for xml in sorted(ann_dir.glob("*.xml"))]
    chosen, seen = [], []
    for image_path, xml_path in pairs:
        if len(chosen) == skip + count:
            break
        if not image_path.is_file() or not wbc_boxes(xml_path):
            continue
        work = prepare(read_rgb(image_path), BCCD_UM_PER_PIXEL)
        if not any(register(other, work, SAME_PLACE, max_shift_um=math.inf).ok for other in seen):
            chosen.append((image_path, xml_path))
            seen.append(work)
    if len(chosen) < skip + count:
        raise DataError(f"{root}: {len(chosen)} distinct annotated fields with a white cell, the scan needs "
                        f"{skip + count}; expected BCCD/{{JPEGImages,Annotations}} there")
    return chosen[skip:]


def wbc_boxes(xml_path: Path) -> list[tuple[int, int, int, int]]:
    """Valid (non-empty) WBC boxes of a Pascal VOC annotation. Raises DataError when malformed."""
    try:
        objects = ET.parse(xml_path).getroot().iter("object")
        boxes = [tuple(int(float(o.findtext(f"bndbox/{k}"))) for k in ("xmin", "ymin", "xmax", "ymax"))
                 for o in objects if (o.findtext("name") or "").strip() == "WBC"]
    except (ET.ParseError, TypeError, ValueError) as err:
        raise DataError(f"{xml_path}: not a valid Pascal VOC annotation ({err})") from err
    return [b for b in boxes if b[2] - b[0] > 8 and b[3] - b[1] > 8]


def build_slide(fields: list[tuple[Path, Path]], settings: ScanSettings = ScanSettings()) -> Slide:
    """Tile the fields row by row, background-balanced and cross-faded at the seams.

    Raises DataError when there are fewer fields than the mosaic has places.
    """
    if len(fields) < settings.columns * settings.rows:
        raise DataError(f"a {settings.columns}x{settings.rows} mosaic needs {settings.columns * settings.rows} "
                        f"fields, got {len(fields)}")
    fw, fh = settings.frame_size
    pitch = (fw - settings.seam_px, fh - settings.seam_px)
    height, width = pitch[1] * settings.rows + settings.seam_px, pitch[0] * settings.columns + settings.seam_px
    total, weights, cells = np.zeros((height, width, 3), np.float32), np.zeros((height, width, 1), np.float32), []
    for k, (image_path, xml_path) in enumerate(fields[: settings.columns * settings.rows]):
        x, y = (k % settings.columns) * pitch[0], (k // settings.columns) * pitch[1]
        image = _balanced(_field_image(image_path, settings.frame_size), settings.white)
        weight = _feather(fh, fw, settings.seam_px)
        total[y:y + fh, x:x + fw] += image * weight
        weights[y:y + fh, x:x + fw] += weight
        cells += [_truth(len(cells) + i, box, (x, y), settings, image_path.stem)
                  for i, box in enumerate(wbc_boxes(xml_path))]
    image = np.clip(total / np.maximum(weights, 1e-6) + 0.5, 0, 255).astype(np.uint8)
    return Slide(image=image, cells=tuple(cells), um_per_pixel=settings.um_per_pixel)


def _field_image(path: Path, size: tuple[int, int]) -> np.ndarray:
    image = read_rgb(path)
    if image.shape[1::-1] != size:
        raise DataError(f"{path}: field of {image.shape[1]}x{image.shape[0]} px, the mosaic needs {size[0]}x{size[1]}")
    return image


def _balanced(image: np.ndarray, white: float) -> np.ndarray:
    """Scale each channel so that the background (97th percentile) is `white`."""
    levels = np.percentile(image.reshape(-1, 3)[::7], 97, axis=0)
    return image.astype(np.float32) * (white / np.maximum(levels, 1.0))


def _feather(height: int, width: int, seam: int) -> np.ndarray:
    """Weights rising linearly from the edges over `seam` pixels (cross-fade between fields)."""
    ramp = lambda n: np.minimum(1.0, (np.minimum(np.arange(n), np.arange(n)[::-1]) + 0.5) / max(seam, 1))
    return (ramp(height)[:, None] * ramp(width)[None, :])[:, :, None].astype(np.float32)


def _truth(cell_id: int, box, origin, settings: ScanSettings, field: str) -> TruthCell:
    """A field's WBC box on the slide; cut when it reaches into the seam or the field edge."""
    fw, fh = settings.frame_size
    s = settings.seam_px
    whole = box[0] >= s and box[1] >= s and box[2] <= fw - s and box[3] <= fh - s
    x, y = origin
    return TruthCell(cell_id, (box[0] + x, box[1] + y, box[2] + x, box[3] + y), bool(whole), field)


def scan_path(slide_size: tuple[int, int], settings: ScanSettings = ScanSettings()) -> list[tuple[tuple[int, int], str]]:
    """Window origins and how each was reached: a serpentine with fast steps and detours."""
    rng = np.random.default_rng(settings.seed)
    path = _serpentine(slide_size, settings, rng)
    for _ in range(settings.detours):
        at = int(rng.integers(len(path) // 10 + 1, max(len(path) * 9 // 10, len(path) // 10 + 2)))
        path[at:at] = _detour(path[at - 1][0], slide_size, settings, rng)
    return path


def _serpentine(slide_size, settings: ScanSettings, rng) -> list[tuple[tuple[int, int], str]]:
    """Rows of pan steps, alternately left-to-right and right-to-left, two steps between rows."""
    xmax, ymax = slide_size[0] - settings.frame_size[0], slide_size[1] - settings.frame_size[1]
    rows = list(range(0, ymax, settings.row_step_px)) + [ymax]
    path, x = [((0, 0), START)], 0
    for r, y in enumerate(rows):
        if r:
            mid = (rows[r - 1] + y) // 2
            path += [((x, mid), STEP), ((x, y), STEP)]
        target = xmax if r % 2 == 0 else 0
        while x != target:
            fast = rng.random() < settings.fast_fraction
            step = int(rng.integers(*(settings.fast_step_px if fast else settings.step_px)))
            x = min(x + step, target) if target else max(x - step, 0)
            wobble = int(np.clip(y + rng.integers(-settings.wobble_px, settings.wobble_px + 1), 0, ymax))
            path.append(((x, wobble), FAST if fast else STEP))
    return path


def _detour(back_to, slide_size, settings: ScanSettings, rng) -> list[tuple[tuple[int, int], str]]:
    """A jump to a random place, a few pan steps there, and a jump back to `back_to`."""
    xmax, ymax = slide_size[0] - settings.frame_size[0], slide_size[1] - settings.frame_size[1]
    x, y = int(rng.integers(0, xmax + 1)), int(rng.integers(0, ymax + 1))
    steps = [((x, y), JUMP)]
    for _ in range(settings.detour_steps):
        x = int(np.clip(x + rng.integers(-settings.step_px[1], settings.step_px[1] + 1), 0, xmax))
        y = int(np.clip(y + rng.integers(-settings.step_px[0], settings.step_px[0] + 1), 0, ymax))
        steps.append(((x, y), STEP))
    return steps + [(back_to, JUMP)]


def scan(slide: Slide, settings: ScanSettings = ScanSettings()) -> Iterator[SimFrame]:
    """Camera frames along `scan_path`, with noise, defocused frames and smeared fast steps."""
    rng = np.random.default_rng(settings.seed + 1)
    previous = (0, 0)
    for index, (origin, kind) in enumerate(scan_path(slide.image.shape[1::-1], settings)):
        x, y = origin
        fw, fh = settings.frame_size
        image = slide.image[y:y + fh, x:x + fw].astype(np.float32)
        blurred = kind == FAST or rng.random() < settings.defocus_fraction
        if kind == FAST:
            image = _motion_blur(image, (x - previous[0], y - previous[1]), settings.motion_blur_fraction)
        elif blurred:
            image = cv2.GaussianBlur(image, (0, 0), float(rng.uniform(*settings.defocus_sigma_px)))
        image = image * rng.uniform(0.97, 1.03) + rng.normal(0.0, settings.noise_sigma, image.shape)
        image = np.clip(image + 0.5, 0, 255).astype(np.uint8)
        visible = tuple(c.id for c in slide.cells if c.whole and _inside(c.box, origin, settings.frame_size))
        yield SimFrame(index, image, origin, kind, bool(blurred), visible)
        previous = origin


def _motion_blur(image: np.ndarray, motion: tuple[int, int], fraction: float) -> np.ndarray:
    """Smear along the motion over `fraction` of its length (the exposure of a moving stage)."""
    length = max(1, int(round(np.hypot(*motion) * fraction)))
    kernel = np.zeros((2 * length + 1, 2 * length + 1), np.float32)
    direction = np.array(motion, float) / max(np.hypot(*motion), 1e-9)
    for t in np.linspace(-length / 2, length / 2, 2 * length + 1):
        kernel[int(round(length + t * direction[1])), int(round(length + t * direction[0]))] = 1.0
    return cv2.filter2D(image, -1, kernel / kernel.sum(), borderType=cv2.BORDER_REFLECT)


def _inside(box, origin, size) -> bool:
    x, y = origin
    return box[0] >= x and box[1] >= y and box[2] <= x + size[0] and box[3] <= y + size[1]


def write_scan(frames, folder: Path, slide: Slide | None = None, suffix: str = ".png") -> Path:
    """Write frames as frame_NNNN<suffix> and their truth (and the slide's cells) to truth.json.

    Returns the folder. Raises DataError when a frame cannot be written.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    truth = []
    for frame in frames:
        name = f"frame_{frame.index:04d}{suffix}"
        if not cv2.imwrite(str(folder / name), frame.image[:, :, ::-1]):
            raise DataError(f"{folder / name}: could not write the frame (unknown suffix {suffix}?)")
        truth.append({"file": name, "origin": list(frame.origin), "kind": frame.kind,
                      "blurred": frame.blurred, "visible": list(frame.visible)})
    cells = [{"id": c.id, "box": list(c.box), "whole": c.whole, "field": c.field} for c in (slide.cells if slide else ())]
    (folder / "truth.json").write_text(json.dumps({"frames": truth, "cells": cells}, indent=1))
    logger.info("wrote %d frames to %s", len(truth), folder)
    return folder


@dataclass(frozen=True)
class ScanScore:
    """Counted cells against the truth of a simulated scan."""

    in_view: int  # whole truth cells fully in view in at least one sharp frame
    counted: int  # cells the tracker counted
    matched: int  # in-view truth cells counted at least once
    doubles: int  # counts beyond the first of a whole truth cell
    missed: int  # in-view truth cells never counted
    cut: int  # counted cells on annotated cells cut by a seam or field edge (neither right nor wrong)
    false_positives: int  # counted cells on no annotated white cell
    cut_doubles: int = 0  # counts beyond the first of a cut cell (a ghost at a seam moves between views)


def truth_at(slide: Slide, point: tuple[float, float]) -> TruthCell | None:
    """The annotated cell whose box holds a slide point (the nearest centre if several), or None."""
    x, y = point
    inside = [c for c in slide.cells if c.box[0] <= x < c.box[2] and c.box[1] <= y < c.box[3]]
    return min(inside, key=lambda c: np.hypot((c.box[0] + c.box[2]) / 2 - x, (c.box[1] + c.box[3]) / 2 - y),
               default=None)


def score(slide: Slide, frames, counted) -> ScanScore:
    """Score counted cells, given as (frame origin, detection centre in frame pixels), against
    the frames' truth (SimFrame origin, blurred, visible)."""
    in_view = {i for f in frames if not f.blurred for i in f.visible}
    hits = [truth_at(slide, (origin[0] + cx, origin[1] + cy)) for origin, (cx, cy) in counted]
    ids = [c.id for c in hits if c is not None and c.whole]
    cut = [c.id for c in hits if c is not None and not c.whole]
    matched = in_view & set(ids)
    return ScanScore(in_view=len(in_view), counted=len(counted), matched=len(matched),
                     doubles=len(ids) - len(set(ids)), cut_doubles=len(cut) - len(set(cut)),
                     missed=len(in_view - matched),
                     cut=len({c.id for c in hits if c is not None and not c.whole}),
                     false_positives=sum(c is None for c in hits))
