"""hematovision-calibrate end to end on image files: commands, exit codes and refusals."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from hematovision.calibration.cli import main
from hematovision.calibration.flatfield import non_uniformity
from hematovision.calibration.profile import load_profile, previous_path
from hematovision.pixels import read_rgb

from test_calibration import blank_field, blur_series, ruling_image


def _write(path, image) -> str:
    assert cv2.imwrite(str(path), np.ascontiguousarray(image[:, :, ::-1]))
    return str(path)


@pytest.fixture
def blanks(tmp_path):
    return [_write(tmp_path / f"blank{i}.png", blank_field(seed=i)) for i in range(3)]


@pytest.fixture
def sample_field(samples_bccd):
    return read_rgb(samples_bccd / "BCCD" / "JPEGImages" / "BloodImage_00000.jpg")


def test_calibration_end_to_end_from_files(tmp_path, blanks, sample_field, capsys):
    profile = str(tmp_path / "profile.json")
    assert main(["blank", *blanks, "--profile", profile, "--exposure-us", "12000", "--colour-gains", "1.8", "1.4"]) == 0
    ruling = _write(tmp_path / "ruling.png", ruling_image(23.7, 5.0))
    assert main(["micrometer", ruling, "--division-um", "10", "--profile", profile]) == 0
    printed = capsys.readouterr().out
    assert "um_per_pixel = 0.42" in printed
    series = [_write(tmp_path / f"focus{i}.png", f) for i, f in enumerate(blur_series(sample_field))]
    assert main(["focus", *series, "--profile", profile]) == 0
    target = str(tmp_path / "bundle_stats.json")
    assert main(["stain-stats", series[0], "--out", target]) == 0
    assert main(["colour", series[0], "--profile", profile, "--target", target]) == 0
    saved = load_profile(profile)
    assert abs(saved.pixel_size.um_per_pixel - 10 / 23.7) < 0.01 * 10 / 23.7
    assert saved.camera_controls.to_picamera2()["AeEnable"] is False
    assert saved.focus.threshold > 0 and saved.colour is not None
    assert json.loads(open(profile).read())["camera_controls"]["ExposureTime"] == 12000
    assert main(["show", profile]) == 0
    shown = capsys.readouterr().out
    assert "um_per_pixel: 0.42" in shown and "ColourGains: (1.80, 1.40)" in shown


def test_apply_writes_the_flat_fielded_image(tmp_path, blanks):
    profile = str(tmp_path / "profile.json")
    assert main(["blank", *blanks, "--profile", profile]) == 0
    held_out = _write(tmp_path / "held_out.png", blank_field(seed=50))
    assert main(["apply", "--profile", profile, held_out, "--out", str(tmp_path / "out.png")]) == 0
    assert non_uniformity(read_rgb(tmp_path / "out.png")) <= 0.02


def test_redcells_stores_a_labelled_estimate(tmp_path, samples_bccd, capsys):
    fields = [str(samples_bccd / "BCCD" / "JPEGImages" / f"BloodImage_{n:05d}.jpg") for n in (0, 1, 2)]
    profile = str(tmp_path / "profile.json")
    assert main(["redcells", *fields, "--profile", profile]) == 0
    assert "ESTIMATE" in capsys.readouterr().out
    saved = json.loads(open(profile).read())["pixel_size"]
    assert saved["source"] == "red-cell estimate" and saved["estimate"] is True


def test_blank_with_cells_is_refused_and_the_old_profile_kept(tmp_path, blanks, sample_field, capsys):
    profile = tmp_path / "profile.json"
    assert main(["blank", *blanks, "--profile", str(profile)]) == 0
    before = profile.read_bytes()
    smear = _write(tmp_path / "smear.png", sample_field)
    assert main(["blank", smear, "--profile", str(profile)]) == 1
    assert "move to an empty area of the slide" in capsys.readouterr().err
    assert profile.read_bytes() == before and not previous_path(profile).exists()


@pytest.mark.parametrize("scale, reason", [(1.6, "saturated"), (0.1, "too dark")])
def test_saturated_or_dark_blank_exits_1_with_the_reason(tmp_path, scale, reason, capsys):
    image = np.clip(blank_field(seed=1).astype(np.float32) * scale, 0, 255).astype(np.uint8)
    assert main(["blank", _write(tmp_path / "b.png", image), "--profile", str(tmp_path / "p.json")]) == 1
    assert reason in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()


def test_ruling_that_cannot_be_found_exits_1(tmp_path, blanks, sample_field, capsys):
    profile = str(tmp_path / "profile.json")
    main(["blank", *blanks, "--profile", profile])
    smear = _write(tmp_path / "smear.png", sample_field)
    assert main(["micrometer", smear, "--division-um", "10", "--profile", profile]) == 1
    assert "ruling" in capsys.readouterr().err


def test_image_of_the_wrong_size_for_the_camera_exits_1(tmp_path, blanks, capsys):
    profile = str(tmp_path / "profile.json")
    main(["blank", *blanks, "--profile", profile])
    small = _write(tmp_path / "small.png", ruling_image(23.7, 0.0, size=(416, 416)))
    assert main(["micrometer", small, "--division-um", "10", "--profile", profile]) == 1
    assert "made for 640x480" in capsys.readouterr().err
    assert main(["apply", "--profile", profile, small, "--out", str(tmp_path / "o.png")]) == 1


@pytest.mark.parametrize("argv", [
    [], ["frobnicate"], ["blank", "--profile"], ["micrometer", "x.png", "--profile", "p.json"],
    ["show"], ["blank", "--profile", "p.json"],
])
def test_bad_usage_exits_2(argv, capsys):
    assert main(argv) == 2
    assert "error" in capsys.readouterr().err


def test_missing_profile_exits_1_saying_how_to_create_it(tmp_path, capsys):
    assert main(["show", str(tmp_path / "none.json")]) == 1
    assert "hematovision-calibrate blank" in capsys.readouterr().err
