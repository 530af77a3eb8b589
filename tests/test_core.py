"""The shared core: class list, crop geometry and pixel preprocessing on a fixed real image."""

import subprocess
import sys

import cv2
import numpy as np
import pytest

from hematovision.calibration.colour import stain_stats
from hematovision.classes import (DEFAULT_CLASSES, KNOWN_CLASSES, PER_100_WBC, REJECT, UNIDENTIFIED,
                                  differential_classes, parse_label, role, validate_class_list)
from hematovision.crop import DEFAULT_GEOMETRY, NO_JITTER, CropGeometry, CropJitter, crop_matrix, cut_crop, cut_crops
from hematovision.edge.vision.locate import SCALE_RED_CELLS, NoCellFound, locate_cell
from hematovision.errors import DataError, ImageUnreadable, ModelInvalid
from hematovision.stain import NO_STANDARD, REINHARD, ColourStandard, standardise_crops
from hematovision.pixels import model_input, read_rgb

FIELD = "BCCD/JPEGImages/BloodImage_00000.jpg"
CENTRE = (375.5, 276.5)  # the neutrophil's box centre in that field
UM_PER_PX = 0.072


@pytest.fixture(scope="module")
def field(samples_bccd):
    return read_rgb(samples_bccd / FIELD)


def test_class_list_is_lower_case_with_the_second_lab_classes():
    assert DEFAULT_CLASSES == ("neutrophil", "lymphocyte", "monocyte", "eosinophil")
    assert {"basophil", "ig", "erythroblast", "platelet"} <= set(KNOWN_CLASSES)
    assert UNIDENTIFIED not in KNOWN_CLASSES
    assert parse_label("NEUTROPHIL", "x") == "neutrophil"
    assert parse_label(" Eosinophils ", "x") == "eosinophil"
    assert parse_label("IG", "x") == "ig" and parse_label("NRBC", "x") == "erythroblast"


def test_nucleated_red_cells_and_platelets_stay_out_of_the_differential():
    classes = ("neutrophil", "erythroblast", "lymphocyte", "ig", "platelet")
    assert differential_classes(classes) == ("neutrophil", "lymphocyte", "ig")
    assert role("erythroblast") == PER_100_WBC and role("platelet") == REJECT
    with pytest.raises(DataError, match="two white-cell classes"):
        validate_class_list(["neutrophil", "erythroblast", "platelet"], "bundle.json")


def test_unknown_label_error_names_where():
    with pytest.raises(DataError, match=r"labels.csv:7: label 'BLAST'"):
        parse_label("BLAST", "labels.csv:7")
    with pytest.raises(DataError, match="repeats"):
        validate_class_list(["neutrophil", "NEUTROPHIL"], "bundle.json")


def test_read_rgb_gives_rgb_order(field, samples_bccd):
    bgr = cv2.imread(str(samples_bccd / FIELD))
    assert field.shape == (480, 640, 3) and field.dtype == np.uint8
    np.testing.assert_array_equal(field, bgr[:, :, ::-1])


def test_read_rgb_refuses_truncated_file_by_name(tmp_path, samples_bccd):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes((samples_bccd / FIELD).read_bytes()[:200])
    with pytest.raises(ImageUnreadable, match="broken.jpg"):
        read_rgb(broken)


@pytest.mark.parametrize("centre, jitter", [(CENTRE, NO_JITTER), ((8.0, 470.0), NO_JITTER),
                                             (CENTRE, CropJitter(37.0, 1.1, True, (1.0, -0.5)))])
def test_crops_are_the_plain_rgb_warp(field, centre, jitter):
    """The four-channel warp gives exactly OpenCV's three-channel one, mirrored border included."""
    geometry = CropGeometry(side_um=12.0)  # 167 image pixels to 224: no area step
    matrix = crop_matrix(centre, UM_PER_PX, geometry, jitter)
    expected = cv2.warpAffine(field, matrix, (224, 224), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                              borderMode=cv2.BORDER_REFLECT_101)
    np.testing.assert_array_equal(cut_crop(field, centre, UM_PER_PX, geometry, jitter), expected)
    many = cut_crops(field, [centre, CENTRE], UM_PER_PX, geometry, jitter)
    np.testing.assert_array_equal(many[0], expected)
    assert many.shape == (2, 224, 224, 3) and cut_crops(field, [], UM_PER_PX).shape == (0, 224, 224, 3)


def test_crop_has_model_size_and_centre_pixel(field):
    crop = cut_crop(field, CENTRE, UM_PER_PX)
    assert crop.shape == (224, 224, 3) and crop.dtype == np.uint8
    # The crop is 24 um = 333 image pixels wide: area-averaged, its centre matches the field's.
    centre = crop[110:114, 110:114].reshape(-1, 3).mean(0)
    x, y = int(CENTRE[0]), int(CENTRE[1])
    expected = field[y - 2:y + 3, x - 2:x + 3].reshape(-1, 3).mean(0)
    assert np.abs(centre - expected).max() < 12


def test_crop_is_the_same_physical_square_at_any_magnification(field):
    half = cv2.resize(field, (320, 240), interpolation=cv2.INTER_AREA)
    full = cut_crop(field, CENTRE, UM_PER_PX).astype(float)
    small = cut_crop(half, ((CENTRE[0] + 0.5) / 2 - 0.5, (CENTRE[1] + 0.5) / 2 - 0.5), UM_PER_PX * 2).astype(float)
    assert np.abs(full - small).mean() < 4.0


def test_crop_rotation_and_flip_are_exact_for_right_angles(field):
    plain = cut_crop(field, CENTRE, UM_PER_PX, CropGeometry(input_size=64))
    turned = cut_crop(field, CENTRE, UM_PER_PX, CropGeometry(input_size=64), CropJitter(angle_deg=90))
    flipped = cut_crop(field, CENTRE, UM_PER_PX, CropGeometry(input_size=64), CropJitter(flip=True))
    assert np.abs(np.rot90(plain, k=1).astype(int) - turned).max() <= 2
    assert np.abs(plain[:, ::-1].astype(int) - flipped).max() <= 2


def test_crop_near_the_border_is_mirrored_not_black(field):
    crop = cut_crop(field, (5.0, 5.0), UM_PER_PX)
    assert crop.min(axis=2).max() > 0 and (crop.sum(axis=2) == 0).mean() < 0.01


def test_crop_refuses_bad_inputs(field):
    with pytest.raises(DataError, match="pixel size"):
        cut_crop(field, CENTRE, 0.0)
    with pytest.raises(DataError, match="RGB"):
        cut_crop(field[:, :, 0], CENTRE, UM_PER_PX)


def test_model_input_is_float_pixels_0_to_255(field):
    x = model_input(cut_crop(field, CENTRE, UM_PER_PX))
    assert x.shape == (1, 224, 224, 3) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 255.0 and x.max() > 200


@pytest.mark.parametrize("module", ["hematovision.edge", "hematovision.calibration", "hematovision.crop",
                                    "hematovision.pixels", "hematovision.classes"])
def test_device_side_never_imports_tensorflow(module):
    code = (f"import sys, importlib, pkgutil; m = importlib.import_module('{module}');"
            "[importlib.import_module(i.name) for i in pkgutil.walk_packages(getattr(m, '__path__', []), m.__name__ + '.')"
            " if not i.name.endswith(('.capture', 'picamera'))];"
            "bad = [n for n in sys.modules if n.split('.')[0] in ('tensorflow', 'keras', 'tf_keras')];"
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_colour_standard_maps_two_stainings_of_one_cell_to_one_look(field):
    crop = cut_crop(field, CENTRE, UM_PER_PX)
    lab = cv2.cvtColor(crop, cv2.COLOR_RGB2Lab).astype(np.float32)
    lab[..., 0] = lab[..., 0] * 0.8 + 30  # paler and redder: another lab's stain and lamp
    lab[..., 1] += 12
    other = cv2.cvtColor(np.clip(lab, 0, 255).astype(np.uint8), cv2.COLOR_Lab2RGB)
    before = np.abs(crop.astype(int) - other).mean()
    a, b = standardise_crops(np.stack([crop, other]), REINHARD)
    assert np.abs(a.astype(int) - b).mean() < before / 4
    stats = stain_stats([a])
    np.testing.assert_allclose(stats.lab_mean, REINHARD.target_mean, atol=1.5)
    np.testing.assert_allclose(stats.lab_std, REINHARD.target_std, rtol=0.1)
    np.testing.assert_array_equal(standardise_crops(crop, NO_STANDARD), crop)


def test_training_and_device_standardise_a_crop_identically(field, samples_bccd):
    from hematovision.train.batches import sample_crop
    from hematovision.train.datasets import Sample

    sample = Sample(str(samples_bccd / FIELD), "neutrophil", "g", (370, 270, 381, 283), UM_PER_PX)
    device = standardise_crops(cut_crops(field, [sample.center], UM_PER_PX), REINHARD)[0]
    np.testing.assert_array_equal(sample_crop(sample, DEFAULT_GEOMETRY, colour=REINHARD), device)


def test_unknown_colour_method_in_a_bundle_is_refused_by_name():
    with pytest.raises(ModelInvalid, match="bundle.json: colour method 'grey' is unknown"):
        ColourStandard.from_dict({"method": "grey", "target_mean": [1, 2, 3], "target_std": [1, 1, 1]}, "bundle.json")
    assert ColourStandard.from_dict(None) == NO_STANDARD  # a bundle made before standardisation


def test_locate_cell_takes_the_white_cell_at_the_centre(field):
    x, y = (int(v) for v in CENTRE)
    window = field[y - 200:y + 200, x - 260:x + 240]  # the cell near the centre, red cells around
    cell = locate_cell(window, UM_PER_PX)
    assert cell.scale_source == "given" and cell.um_per_pixel == UM_PER_PX
    cx, cy = cell.detection.center
    assert abs(cx - 260) < 25 and abs(cy - 200) < 25
    assert locate_cell(window).scale_source in (SCALE_RED_CELLS, "assumed")
    with pytest.raises(NoCellFound, match="corner: no white cell found at the image centre"):
        locate_cell(field[:240, :260], name="corner")


def test_locate_cell_measures_a_second_labs_scale_from_its_red_cells(samples_pbc):
    for path in sorted(samples_pbc.glob("[lmn]*/*.jpg")):
        cell = locate_cell(read_rgb(path), name=path.name)
        assert cell.scale_source == SCALE_RED_CELLS and 0.08 < cell.um_per_pixel < 0.12, path.name
