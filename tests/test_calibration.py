"""Calibration cores on synthetic images of known truth and on real BCCD fields."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import xml.etree.ElementTree as ET

import cv2
import numpy as np
import pytest

from hematovision.calibration.colour import reinhard_transfer, stain_stats, stats_distance
from hematovision.calibration.correct import correct
from hematovision.calibration.flatfield import measure_blank, non_uniformity
from hematovision.calibration.focus import focus_score, learn_threshold
from hematovision.calibration.micrometer import find_ruling, pixel_size_from_ruling
from hematovision.calibration.profile import (
    CalibrationProfile, ColourCalibration, PixelSize, check_against_bundle, load_profile, previous_path,
    profile_to_dict, save_profile,
)
from hematovision.calibration.redcells import pixel_size_from_red_cells
from hematovision.errors import CalibrationError, ConfigError
from hematovision.pixels import read_rgb

RBC_DIAMETER_UM = 7.5
BLUR_SIGMAS = (0.0, 0.7, 1.4, 2.1, 2.8, 3.5, 4.5)


def blank_field(seed: int, falloff: float = 0.30, noise: float = 0.02, size=(480, 640)) -> np.ndarray:
    """A blank field whose brightness falls by `falloff` towards the farthest corner, with a colour cast."""
    h, w = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    cx, cy = w * 0.55, h * 0.45
    r2 = ((x - cx) ** 2 + (y - cy) ** 2) / max((cx**2 + cy**2), ((w - cx) ** 2 + (h - cy) ** 2))
    base = np.array([0.85, 0.75, 0.60], np.float32) * 255
    noisy = (1 - falloff * r2)[..., None] * base * (1 + noise * np.random.default_rng(seed).standard_normal((h, w, 3)))
    return np.clip(noisy + 0.5, 0, 255).astype(np.uint8)


def ruling_image(period: float, angle_deg: float, size=(480, 640), seed: int = 0) -> np.ndarray:
    """Dark lines `period` pixels apart, perpendicular to `angle_deg`, blurred and noisy."""
    h, w = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    t = math.radians(angle_deg)
    u = (x - w / 2) * math.cos(t) + (y - h / 2) * math.sin(t) + 3.3
    d = (u / period - np.round(u / period)) * period
    image = 200 - 140 * np.exp(-((d / max(period / 10, 1.2)) ** 2))
    image = cv2.GaussianBlur(image, (0, 0), 1.0) + np.random.default_rng(seed).normal(0, 4, image.shape)
    return np.dstack([np.clip(image, 0, 255).astype(np.uint8)] * 3)


def blur_series(image: np.ndarray, seed: int = 0) -> list[np.ndarray]:
    """A synthetic through-focus series: Gaussian blur of increasing sigma, plus sensor noise."""
    rng = np.random.default_rng(seed)
    frames = []
    for sigma in BLUR_SIGMAS:
        blurred = image.astype(np.float32) if sigma == 0 else cv2.GaussianBlur(image.astype(np.float32), (0, 0), sigma)
        frames.append(np.clip(blurred + rng.normal(0, 3, blurred.shape), 0, 255).astype(np.uint8))
    return frames


def bccd_field(root, number: int) -> np.ndarray:
    return read_rgb(root / "JPEGImages" / f"BloodImage_{number:05d}.jpg")


@pytest.fixture(scope="module")
def blank():
    return measure_blank([blank_field(seed) for seed in range(3)])


# Flat field -------------------------------------------------------------------------------

def test_flat_field_leaves_under_2_percent_non_uniformity_after_30_percent_vignetting(blank):
    held_out = blank_field(seed=99)
    profile = CalibrationProfile(image_size=(640, 480), blank=blank)
    assert non_uniformity(held_out) > 0.25
    assert non_uniformity(correct(held_out, profile)) <= 0.02


def test_flat_field_makes_a_blank_neutral_at_the_white_target(blank):
    corrected = correct(blank_field(seed=98), CalibrationProfile(image_size=(640, 480), blank=blank))
    means = corrected.reshape(-1, 3).mean(0)
    assert np.allclose(means, blank.white_target * 255, atol=2.0)


def test_blank_with_cells_is_refused_with_what_to_do():
    field = blank_field(seed=1)
    for cx, cy in ((200, 200), (400, 300), (500, 120)):
        cv2.circle(field, (cx, cy), 30, (150, 90, 100), -1)
    with pytest.raises(CalibrationError, match="move to an empty area of the slide"):
        measure_blank([field])


def test_real_smear_as_blank_is_refused(shared_data):
    with pytest.raises(CalibrationError, match="not blank"):
        measure_blank([bccd_field(shared_data / "bccd" / "BCCD", 0)])


@pytest.mark.parametrize("scale, reason", [(1.6, "saturated"), (0.1, "too dark")])
def test_saturated_or_dark_blank_is_refused(scale, reason):
    field = np.clip(blank_field(seed=2).astype(np.float32) * scale, 0, 255).astype(np.uint8)
    with pytest.raises(CalibrationError, match=reason):
        measure_blank([field])


def test_blank_frames_with_drifting_exposure_are_refused():
    brighter = np.clip(blank_field(seed=3).astype(np.float32) * 1.1, 0, 255).astype(np.uint8)
    with pytest.raises(CalibrationError, match="auto-exposure"):
        measure_blank([blank_field(seed=2), brighter])


def test_image_of_the_wrong_size_for_the_camera_is_refused(blank):
    profile = CalibrationProfile(image_size=(640, 480), blank=blank)
    with pytest.raises(ConfigError, match="made for 640x480"):
        correct(np.zeros((416, 416, 3), np.uint8), profile)


# Pixel size -------------------------------------------------------------------------------

@pytest.mark.parametrize("angle", [0.0, 5.0])
@pytest.mark.parametrize("period", [9.37, 23.7, 61.3])
def test_pixel_size_within_1_percent_of_truth_on_synthetic_rulings(period, angle):
    size = pixel_size_from_ruling(ruling_image(period, angle), division_um=10.0)
    truth = 10.0 / period
    assert abs(size.um_per_pixel - truth) / truth < 0.01
    assert 0 < size.uncertainty < 0.01 * truth and not size.is_estimate


def test_ruling_angle_is_found():
    assert find_ruling(ruling_image(23.7, 5.0)).angle_deg == pytest.approx(95.0, abs=1.0)


def test_image_without_a_ruling_is_refused():
    noise = np.random.default_rng(1).normal(180, 5, (480, 640, 3)).clip(0, 255).astype(np.uint8)
    with pytest.raises(CalibrationError, match="centre the micrometer ruling"):
        pixel_size_from_ruling(noise, division_um=10.0)


def test_smear_instead_of_a_micrometer_is_refused(shared_data):
    with pytest.raises(CalibrationError, match="ruling"):
        pixel_size_from_ruling(bccd_field(shared_data / "bccd" / "BCCD", 0), division_um=10.0)


def _rbc_box_diameters(annotation) -> list[float]:
    """(width + height) / 2 of the RBC boxes that lie wholly inside the 640x480 field."""
    sizes = []
    for obj in ET.parse(annotation).findall("object"):
        if obj.findtext("name", "").strip() == "RBC":
            x0, y0, x1, y1 = (float(obj.find("bndbox").findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
            if x1 > x0 + 2 and y1 > y0 + 2 and x0 > 1 and y0 > 1 and x1 < 638 and y1 < 478:
                sizes.append((x1 - x0 + y1 - y0) / 2)
    return sizes


def test_red_cell_estimate_agrees_within_10_percent_with_bccd_boxes(shared_data):
    root = shared_data / "bccd" / "BCCD"
    numbers = range(3, 410, 20)  # not the fields the edge-foot setting was chosen on (every 12th)
    paths = [n for n in numbers if (root / "JPEGImages" / f"BloodImage_{n:05d}.jpg").exists()]
    boxes = [d for n in paths for d in _rbc_box_diameters(root / "Annotations" / f"BloodImage_{n:05d}.xml")]
    implied = RBC_DIAMETER_UM / float(np.median(boxes))
    estimate = pixel_size_from_red_cells([bccd_field(root, n) for n in paths])
    assert estimate.is_estimate and estimate.source == "red-cell estimate"
    assert abs(estimate.um_per_pixel - implied) / implied < 0.10


def test_red_cell_estimate_refuses_a_field_without_cells():
    with pytest.raises(CalibrationError, match="red cells found"):
        pixel_size_from_red_cells([blank_field(seed=4)])


# Focus ------------------------------------------------------------------------------------

@pytest.mark.parametrize("number", [0, 88, 272])
def test_focus_score_falls_strictly_over_a_7_step_blur_series_of_real_fields(shared_data, number):
    scores = [focus_score(f) for f in blur_series(bccd_field(shared_data / "bccd" / "BCCD", number))]
    assert all(a > b for a, b in zip(scores, scores[1:])), scores


def test_learned_threshold_separates_sharp_from_blurred_on_held_out_series(shared_data):
    root = shared_data / "bccd" / "BCCD"
    threshold = learn_threshold(blur_series(bccd_field(root, 42), seed=1)).threshold
    for number in (140, 231, 315, 360, 407):
        scores = [focus_score(f) for f in blur_series(bccd_field(root, number), seed=number)]
        sharp, blurred = scores[:2], scores[4:]  # sigma <= 0.7 px vs >= 2.8 px; in between is the margin
        assert min(sharp) > threshold > max(blurred), (number, threshold, scores)


def test_focus_score_is_comparable_across_image_sizes(shared_data):
    field = bccd_field(shared_data / "bccd" / "BCCD", 0)
    whole, half = focus_score(field), focus_score(field[:240, :320])
    assert abs(whole - half) < 0.1 * whole
    row = np.concatenate([field, field[:, ::-1]], axis=1)
    mirrored = np.concatenate([row, row[::-1]], axis=0)  # twice the size, no seams
    assert focus_score(mirrored) == pytest.approx(whole, rel=0.02)


def test_focus_score_of_a_blank_noisy_field_is_zero():
    assert focus_score(blank_field(seed=5)) < 0.05


def test_focus_series_that_never_leaves_focus_is_refused(shared_data):
    field = bccd_field(shared_data / "bccd" / "BCCD", 0)
    with pytest.raises(CalibrationError, match="barely change"):
        learn_threshold([field, field.copy(), field.copy()])


# Colour -----------------------------------------------------------------------------------

def test_reinhard_transfer_brings_stain_statistics_to_the_target(shared_data):
    root = shared_data / "bccd" / "BCCD"
    fields = [bccd_field(root, n) for n in (0, 42, 88)]
    target = stain_stats(fields)
    tinted = [np.clip(f.astype(np.float32) * (0.8, 1.0, 1.15) + (0, -10, 0), 0, 255).astype(np.uint8) for f in fields]
    source = stain_stats(tinted)
    after = stain_stats(reinhard_transfer(t, source, target) for t in tinted)
    assert stats_distance(after, target) < 0.2 * stats_distance(source, target)


def test_stain_statistics_of_a_uniform_image_are_refused():
    with pytest.raises(CalibrationError, match="colour spread"):
        stain_stats([np.full((64, 64, 3), 200, np.uint8)])


# Profile ----------------------------------------------------------------------------------

def _full_profile(blank) -> CalibrationProfile:
    stats = stain_stats([blank_field(seed=6, noise=0.2)])
    return CalibrationProfile(
        image_size=(640, 480), blank=blank, pixel_size=PixelSize(0.1, 0.001, "stage micrometer"),
        colour=ColourCalibration(source=stats, target=stats),
    )


def test_profile_round_trips_through_json(tmp_path, blank):
    profile = _full_profile(blank)
    save_profile(profile, tmp_path / "p.json")
    assert load_profile(tmp_path / "p.json") == profile
    assert json.loads((tmp_path / "p.json").read_text())["pixel_size"]["um_per_pixel"] == 0.1


def test_saving_keeps_the_previous_profile(tmp_path, blank):
    path = tmp_path / "p.json"
    save_profile(CalibrationProfile(image_size=(640, 480)), path)
    save_profile(_full_profile(blank), path)
    assert load_profile(previous_path(path)).blank is None
    assert load_profile(path).blank == blank


def test_failed_write_keeps_the_old_profile_and_leaves_no_temporary_file(tmp_path, blank):
    path = tmp_path / "p.json"
    save_profile(_full_profile(blank), path)
    before = path.read_bytes()
    bad = _full_profile(blank).updated(pixel_size=PixelSize(float("nan"), 0.0, "stage micrometer"))
    with pytest.raises(ConfigError, match="not finite"):
        save_profile(bad, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.json"]


def test_crash_while_writing_keeps_the_old_profile(tmp_path, blank, monkeypatch):
    path = tmp_path / "p.json"
    save_profile(CalibrationProfile(image_size=(640, 480)), path)
    before = path.read_bytes()

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr("hematovision.calibration.profile.os.replace", crash)
    with pytest.raises(OSError):
        save_profile(_full_profile(blank), path)
    assert path.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("edit, key", [
    (lambda d: d.update(extra=1), "extra"),
    (lambda d: d.update(version=99), "version"),
    (lambda d: d["pixel_size"].update(um_per_pixel=-1), "pixel_size.um_per_pixel"),
    (lambda d: d["blank"].update(white_balance_rgb=[1, 1]), "blank.white_balance_rgb"),
])
def test_invalid_profile_is_refused_naming_the_key(tmp_path, blank, edit, key):
    d = profile_to_dict(_full_profile(blank))
    edit(d)
    (tmp_path / "p.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_profile(tmp_path / "p.json")


def test_magnification_mismatch_with_the_model_bundle_is_an_error(blank):
    profile = _full_profile(blank)
    assert check_against_bundle(profile, bundle_pixel_um=0.105, tolerance=0.1) < 0.1
    with pytest.raises(ConfigError, match="magnification mismatch"):
        check_against_bundle(profile, bundle_pixel_um=0.25, tolerance=0.1)
    with pytest.raises(ConfigError, match="no pixel_size"):
        check_against_bundle(CalibrationProfile(image_size=(640, 480)), 0.1)


def test_importing_calibration_loads_no_tensorflow_or_camera_library():
    code = (
        "import sys, hematovision.calibration.cli, hematovision.calibration.capture;"
        "print([m for m in ('tensorflow', 'picamera2', 'keras') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
