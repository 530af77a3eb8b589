"""Training data: loading real fields and folders, grouped splits, and refusing bad input."""

import functools
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from hematovision.edge.vision.segment import segment
from hematovision.errors import DataError
from hematovision.pixels import read_rgb
from hematovision.classes import KNOWN_CLASSES
from hematovision.train.datasets import (BCCD_SAME_CELL, bccd_group, kaggle_origin_groups, lab_of, load_bccd,
                                         load_cell_images, load_folders)
from hematovision.train.holdout import draw_held_out, read_held_out, write_held_out
from hematovision.train.splits import (SplitPlan, make_manifest, read_manifest, split_counts,
                                       write_manifest)


def test_sample_fields_give_one_crop_per_white_cell(samples_bccd):
    data = load_bccd(samples_bccd)
    counts = Counter(s.label for s in data.samples)
    assert counts == {"neutrophil": 11, "eosinophil": 8, "lymphocyte": 8, "monocyte": 8}
    assert 0.06 < data.samples[0].um_per_pixel < 0.085  # 7.5 um red cells are ~100 px here
    assert not data.skipped


def test_full_bccd_skips_ambiguous_fields_and_lists_them(shared_data):
    data = load_bccd(shared_data / "bccd")
    reasons = " ".join(s.reason for s in data.skipped)
    assert "cannot tell which box is which" in reasons and "basophil" in reasons
    assert len(data.samples) > 340 and len(data.skipped) < 25


def test_re_photographed_fields_share_a_group():
    assert bccd_group("BloodImage_00204") == bccd_group("BloodImage_00277")
    assert bccd_group("BloodImage_00205") == bccd_group("BloodImage_00277")  # linked through 00276
    assert bccd_group("BloodImage_00166") == bccd_group("BloodImage_00193")
    assert bccd_group("BloodImage_00204") != bccd_group("BloodImage_00206")
    assert bccd_group("BloodImage_00011") == "bccd:00011"


def test_linked_fields_really_show_the_same_place(shared_data):
    from hematovision.train.kaggle_origins import FieldIndex, MatchSettings, features, gray_of

    settings = MatchSettings()
    images = shared_data / "bccd" / "BCCD" / "JPEGImages"

    def feats(number):
        return features(gray_of(images / f"BloodImage_{number}.jpg", 0.5), settings, number)

    def inliers(a, b):  # RANSAC is asymmetric: the better direction
        return max(FieldIndex([feats(b)]).inliers(feats(a), 0, settings),
                   FieldIndex([feats(a)]).inliers(feats(b), 0, settings))

    feats = functools.lru_cache(maxsize=None)(feats)
    for link in BCCD_SAME_CELL:
        for other in link[1:]:
            assert inliers(link[0], other) >= 15, link
            assert inliers(link[0], "00011") < 10, link


def test_split_keeps_groups_whole_and_every_class_in_every_split(shared_data, tmp_path):
    rows = make_manifest(load_bccd(shared_data / "bccd").samples, SplitPlan(seed=3))
    path = tmp_path / "manifest.csv"
    write_manifest(rows, path)
    again = read_manifest(path)
    assert [r.split for r in again] == [r.split for r in rows]
    pairs = {r.sample.group: set() for r in rows}
    for r in rows:
        pairs[r.sample.group].add(r.split)
    assert all(len(s) == 1 for s in pairs.values())
    counts = split_counts(rows)
    assert all(len(counts[split]) == 4 for split in ("train", "val", "test"))


def test_manifest_with_a_group_across_splits_is_refused(samples_bccd, tmp_path):
    rows = make_manifest(load_bccd(samples_bccd).samples, SplitPlan(seed=0))
    path = tmp_path / "manifest.csv"
    write_manifest(rows, path)
    lines = path.read_text().splitlines()
    victim = lines[1].split(",")
    twin = victim.copy()
    twin[3] = "test" if victim[3] != "test" else "train"
    path.write_text("\n".join(lines + [",".join(twin)]) + "\n")
    with pytest.raises(DataError, match="in both"):
        read_manifest(path)


def _copy_samples(samples_bccd, tmp_path):
    root = tmp_path / "bccd"
    shutil.copytree(samples_bccd, root)
    return root


def test_truncated_field_is_skipped_and_listed(samples_bccd, tmp_path):
    root = _copy_samples(samples_bccd, tmp_path)
    jpg = root / "BCCD/JPEGImages/BloodImage_00003.jpg"
    jpg.write_bytes(jpg.read_bytes()[:300])
    data = load_bccd(root)
    assert [s.path for s in data.skipped] == [str(jpg)]
    assert all(s.path != str(jpg) for s in data.samples)


def test_label_outside_the_class_list_names_file_and_line(samples_bccd, tmp_path):
    root = _copy_samples(samples_bccd, tmp_path)
    labels = root / "labels.csv"
    lines = labels.read_text().splitlines()
    lines[3] = lines[3].replace("NEUTROPHIL", "MEGAKARYOCYTE")
    labels.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"labels.csv:4: label 'MEGAKARYOCYTE'"):
        load_bccd(root)


def test_white_cell_box_outside_its_image_names_file_and_line(samples_bccd, tmp_path):
    root = _copy_samples(samples_bccd, tmp_path)
    xml = root / "BCCD/Annotations/BloodImage_00000.xml"
    xml.write_text(xml.read_text().replace("<xmax>491</xmax>", "<xmax>900</xmax>", 1))
    with pytest.raises(DataError, match=r"BloodImage_00000.xml:\d+: WBC box .* outside the 640x480"):
        load_bccd(root)


def _folder_dataset(samples_bccd, root, classes=("neutrophil", "eosinophil")):
    for cls in classes:
        (root / cls.upper()).mkdir(parents=True)
    jpgs = sorted((samples_bccd / "BCCD/JPEGImages").glob("*.jpg"))
    for i, jpg in enumerate(jpgs[:8]):
        shutil.copy(jpg, root / classes[i % len(classes)].upper() / f"_{i // 4}_{i}.jpeg")
    return root


def test_class_folders_group_images_by_their_bccd_origin(samples_bccd, tmp_path):
    root = _folder_dataset(samples_bccd, tmp_path / "TRAIN")
    names = sorted(p for p in root.rglob("*.jpeg"))
    known = {("TRAIN", p.parent.name.lower(), p.name): "bccd:00011" for p in names[:3]}
    data = load_folders(root, origins=known)
    groups = Counter(s.group for s in data.samples)
    assert len(data.samples) == 8 and groups["bccd:00011"] == 3
    assert sum(g.startswith("file:TRAIN/") for g in groups) == 5 and set(groups.values()) == {1, 3}


def test_kaggle_augmentations_of_one_field_share_its_group_across_train_and_test(shared_data):
    kaggle = shared_data / "kaggle_blood_cells" / "images"
    test = load_folders(kaggle / "TEST")
    known = [s for s in test.samples if s.group.startswith("bccd:")]
    assert len(known) > 0.97 * len(test.samples) and len({s.group for s in known}) < 80
    origins = kaggle_origin_groups()
    train_groups = {g for (split, _, _), g in origins.items() if split == "TRAIN"}
    assert bccd_group("BloodImage_00204") in train_groups & {s.group for s in known}


def test_empty_class_folder_is_an_error_naming_it(samples_bccd, tmp_path):
    root = _folder_dataset(samples_bccd, tmp_path / "TRAIN")
    (root / "MONOCYTE").mkdir()
    with pytest.raises(DataError, match="MONOCYTE: class folder has no images"):
        load_folders(root)


def test_unknown_class_folder_is_an_error(samples_bccd, tmp_path):
    root = _folder_dataset(samples_bccd, tmp_path / "TRAIN")
    (root / "BLAST").mkdir()
    with pytest.raises(DataError, match="BLAST"):
        load_folders(root)


def test_cross_validation_folds_fix_the_test_split_and_keep_groups_whole(shared_data):
    from hematovision.train.splits import grouped_folds

    samples = load_bccd(shared_data / "bccd").samples
    folds = grouped_folds(samples, 5, seed=0)
    assert len(set(folds)) == 5
    seen = {}
    for s, f in zip(samples, folds):
        assert seen.setdefault(s.group, f) == f
    test_groups = {s.group for s, f in zip(samples, folds) if f == "2"}
    rows = make_manifest(samples, SplitPlan(seed=2), test_groups)
    assert {r.sample.group for r in rows if r.split == "test"} == test_groups
    assert {r.split for r in rows} == {"train", "val", "test"}


def test_segmenter_centres_move_crops_to_the_devices_detections(samples_bccd):
    from hematovision.train.device_crops import recentre_on_segmenter

    data = load_bccd(samples_bccd)
    moved = recentre_on_segmenter(data)
    assert len(moved.samples) + len(moved.skipped) == len(data.samples)
    assert len(moved.samples) >= 0.8 * len(data.samples)
    boxes = {}
    for s in data.samples:
        boxes.setdefault(s.path, []).append(s.box)
    for s in moved.samples:
        x, y = s.center
        assert any(x0 <= x <= x1 and y0 <= y <= y1 for x0, y0, x1, y1 in boxes[s.path])
        centres = [d.center for d in segment(read_rgb(s.path), um_per_pixel=s.um_per_pixel).all_cells]
        assert min(np.hypot(x - cx, y - cy) for cx, cy in centres) <= 0.75  # where the device cuts its crop
    assert all("segmenter finds no white cell" in k.reason for k in moved.skipped)
    assert moved.sources == ["bccd:bccd (segmenter centres)"]


def test_single_cell_images_are_cut_where_the_device_finds_the_centre_cell(samples_pbc):
    data = load_cell_images(samples_pbc, KNOWN_CLASSES)
    found = Counter(s.label for s in data.samples)
    assert all(found[c] == 2 for c in KNOWN_CLASSES if c != "platelet")  # every white cell and NRBC found
    for s in data.samples:
        image = read_rgb(s.path)
        h, w = image.shape[:2]
        x0, y0, x1, y1 = s.box
        assert abs(s.center[0] - w / 2) < 60 and abs(s.center[1] - h / 2) < 60  # the labelled cell, at the centre
        assert 0.08 < s.um_per_pixel < 0.12  # PBC: a red cell is some 70 px across
        assert lab_of(s) == "pbc" and s.group == f"pbc:{s.label}/{Path(s.path).stem}"
    assert all("no white cell" in k.reason or "platelet" in k.path for k in data.skipped)


def test_unreadable_single_cell_image_is_skipped_and_listed(samples_pbc, tmp_path):
    shutil.copytree(samples_pbc / "lymphocyte", tmp_path / "cells" / "lymphocyte")
    (tmp_path / "cells" / "lymphocyte" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    data = load_cell_images(tmp_path / "cells", KNOWN_CLASSES)
    assert len(data.samples) == 2 and [Path(k.path).name for k in data.skipped] == ["broken.jpg"]
    assert "not a readable image" in data.skipped[0].reason


def test_held_out_file_names_groups_that_become_the_test_split(samples_pbc, samples_bccd, tmp_path):
    cells = load_cell_images(samples_pbc, KNOWN_CLASSES).samples
    drawn = draw_held_out(cells, 0.5, seed=3)
    assert Counter(label for _, label in drawn) == Counter({c: 1 for c in {s.label for s in cells}})
    write_held_out(drawn, tmp_path / "test_cells.csv")
    assert read_held_out([tmp_path / "test_cells.csv"]) == {g for g, _ in drawn}
    origins = tmp_path / "fields.csv"
    origins.write_text("bccd_field,confident\nBloodImage_00204,1\n")
    both = read_held_out([tmp_path / "test_cells.csv", origins])
    assert {"bccd:00204"} | {g for g, _ in drawn} == both  # 00204's partner 00277 shares its group
    (tmp_path / "bad.csv").write_text("image\nx\n")
    with pytest.raises(DataError, match="bad.csv:1: no bccd_field column"):
        read_held_out([tmp_path / "bad.csv"])
