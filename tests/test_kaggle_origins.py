"""Kaggle images back to their BCCD fields: local-feature matching, the committed TEST origins, the hold-out."""

import csv
import json
from collections import Counter

import cv2
import numpy as np
import pytest

from hematovision.errors import DataError
from hematovision.train.datasets import bccd_group, load_bccd
from hematovision.train.kaggle_origins import (MatchSettings, gray_of, held_out_groups, index_bccd, index_fields,
                                               match_image, read_test_fields)

INDEXED = ("BloodImage_00000", "BloodImage_00011", "BloodImage_00038", "BloodImage_00083",
           "BloodImage_00110", "BloodImage_00196")
NOT_INDEXED = "BloodImage_00225"


def kaggle_like(path, angle: float, shift: tuple[int, int], mirror: bool, zoom: float = 1.0) -> np.ndarray:
    """A 320x240 augmentation like the Kaggle set's: rotated, shifted, zoomed, black corners."""
    gray = gray_of(path, 0.5)
    warp = cv2.getRotationMatrix2D((160, 120), angle, zoom)
    warp[:, 2] += shift
    out = cv2.warpAffine(gray, warp, (320, 240), borderValue=0)
    return cv2.flip(out, 1) if mirror else out


@pytest.fixture(scope="module")
def sample_index(samples_bccd):
    return index_fields([samples_bccd / "BCCD" / "JPEGImages" / f"{n}.jpg" for n in INDEXED])


@pytest.mark.parametrize("name,angle,mirror", [(INDEXED[1], 23.0, True), (INDEXED[4], -140.0, False)])
def test_augmented_field_matches_back_with_a_clear_margin(samples_bccd, sample_index, name, angle, mirror):
    image = kaggle_like(samples_bccd / "BCCD" / "JPEGImages" / f"{name}.jpg", angle, (25, -15), mirror, 1.1)
    match = match_image(image, sample_index)
    assert (match.field, match.mirrored, match.confident) == (name, mirror, True)
    assert match.inliers >= 30 and match.inliers >= 3 * match.runner_up


def test_field_outside_the_index_and_noise_are_not_confident(samples_bccd, sample_index):
    other = kaggle_like(samples_bccd / "BCCD" / "JPEGImages" / f"{NOT_INDEXED}.jpg", 10.0, (0, 0), False)
    noise = np.random.default_rng(0).integers(0, 256, (240, 320), dtype=np.uint8)
    for image in (other, noise, np.zeros((240, 320), np.uint8)):
        assert not match_image(image, sample_index).confident


def test_confidence_needs_enough_inliers_and_a_margin_over_the_rival():
    rule = MatchSettings(min_inliers=20, min_margin=2.0)
    assert rule.is_confident(40, 20) and rule.is_confident(20, 0)
    assert not rule.is_confident(39, 20) and not rule.is_confident(19, 0)


def _origins_rows(repo_root, name="kaggle_test_origins.csv"):
    with (repo_root / "train" / name).open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_committed_test_origins_cover_every_test_image_and_the_71_originals(repo_root):
    rows = [r for r in _origins_rows(repo_root) if r["split"] == "TEST"]
    confident = [r for r in rows if r["confident"] == "1"]
    assert len(rows) == 2487 and len(confident) >= 0.97 * len(rows)
    fields = Counter(label for label, _ in {(r["label"], r["bccd_field"]) for r in confident})
    assert fields == {"eosinophil": 13, "lymphocyte": 6, "monocyte": 4, "neutrophil": 49}
    assert len(held_out_groups(repo_root / "train" / "kaggle_test_origins.csv")) == 67  # 72 fields, some one cell


def test_kaggle_train_shares_only_re_photographed_cells_with_test(repo_root):
    train = [r for r in _origins_rows(repo_root, "kaggle_train_origins.csv") if r["confident"] == "1"]
    test = [r for r in _origins_rows(repo_root) if r["confident"] == "1"]
    assert len(train) >= 0.9 * 9957
    shared = {r["bccd_group"] for r in train} & {r["bccd_group"] for r in test}
    # fields of one cell (or overlapping fields) split across Kaggle's TRAIN and TEST, e.g. 00277 / 00204
    assert shared == {"bccd:00039", "bccd:00204", "bccd:00223", "bccd:00230", "bccd:00364", "bccd:00365"}


@pytest.mark.shared_data
def test_test_images_match_the_fields_recorded_in_the_committed_csv(shared_data, repo_root):
    index = index_bccd(shared_data / "bccd")
    images = shared_data / "kaggle_blood_cells" / "images"
    rows = [r for r in _origins_rows(repo_root) if r["split"] == "TEST" and r["confident"] == "1"]
    for row in (rows[0], rows[700], rows[1300], rows[-1]):  # one of each class
        match = match_image(gray_of(images / "TEST" / row["label"].upper() / row["image"]), index)
        assert (match.field, match.confident) == (row["bccd_field"], True), row


def _origins_csv(path, fields, confident="1"):
    path.write_text("split,label,image,bccd_field,confident\n"
                    + "".join(f"TEST,neutrophil,_0_{i}.jpeg,{f},{confident}\n" for i, f in enumerate(fields)))
    return path


def test_held_out_fields_bring_their_re_photographed_partners(tmp_path):
    path = _origins_csv(tmp_path / "o.csv", ["BloodImage_00277", "BloodImage_00011", "BloodImage_00011"])
    assert held_out_groups(path) == {bccd_group("BloodImage_00204"), "bccd:00011"}


def test_unconfident_rows_are_not_held_out_and_a_file_without_fields_is_an_error(tmp_path):
    assert read_test_fields(_origins_csv(tmp_path / "o.csv", ["BloodImage_00011"], "0")) == set()
    with pytest.raises(DataError, match="nothing to hold out"):
        held_out_groups(tmp_path / "o.csv")
    (tmp_path / "bad.csv").write_text("split,field\nTEST,x\n")
    with pytest.raises(DataError, match="no bccd_field column"):
        held_out_groups(tmp_path / "bad.csv")


def test_test_fields_are_exactly_the_test_split_and_the_rest_is_split_as_before(samples_bccd, tmp_path):
    from hematovision.train.recipe import RunPaths, TrainConfig, prepare_run
    from hematovision.train.splits import read_manifest

    data = load_bccd(samples_bccd)
    held = ["BloodImage_00000", "BloodImage_00038", "BloodImage_00110", "BloodImage_00196"]
    groups = held_out_groups(_origins_csv(tmp_path / "origins.csv", held))
    run = RunPaths(tmp_path / "run")
    prepare_run(run, TrainConfig(backbone="tiny_cnn", weights="none"), data, groups, "origins.csv")
    rows = read_manifest(run.manifest)
    assert {r.sample.group for r in rows if r.split == "test"} == groups
    assert {r.split for r in rows if r.sample.group not in groups} == {"train", "val"}
    provenance = json.loads(run.data.read_text())
    assert provenance["test_groups"] == {"source": "origins.csv", "groups": sorted(groups)}


def test_fit_test_fields_option_holds_those_groups_out_and_records_the_file(samples_bccd, tmp_path, monkeypatch):
    from hematovision.train import recipe
    from hematovision.train.cli import main as train_main
    from hematovision.train.splits import read_manifest

    monkeypatch.setattr(recipe, "train", lambda run: run.root)  # prepare the run only
    origins = _origins_csv(tmp_path / "kaggle_test_origins.csv", ["BloodImage_00011", "BloodImage_00083"])
    out = tmp_path / "run"
    assert train_main(["fit", "--bccd", str(samples_bccd), "--backbone", "tiny_cnn", "--weights", "none",
                       "--test-fields", str(origins), "--out", str(out)]) == 0
    assert {r.sample.group for r in read_manifest(out / "manifest.csv") if r.split == "test"} == {
        "bccd:00011", "bccd:00083"}
    assert json.loads((out / "data.json").read_text())["test_groups"]["source"] == "kaggle_test_origins.csv"
    missing = train_main(["fit", "--bccd", str(samples_bccd), "--test-fields", str(tmp_path / "none.csv"),
                          "--out", str(tmp_path / "run2")])
    assert missing == 1
