"""Site adaptation: the head over the int8 features, the bundle's reference cells, `hematovision-train adapt`
on real single-cell images, and the adapted bundle on the device's loader."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from hematovision.edge.cli import main as edge_main
from hematovision.edge.vision.classify import classify_cell_image
from hematovision.edge.vision.model_bundle import load_bundle
from hematovision.classes import KNOWN_CLASSES
from hematovision.errors import DataError, ModelInvalid
from hematovision.head import Head, fit_head
from hematovision.pixels import read_rgb
from hematovision.reference_cells import ReferenceCells
from hematovision.train.adapt_run import reference_of, summary_lines
from hematovision.train.cli import main as train_main
from hematovision.train.site_cells import dihedral_views, read_verified


@pytest.fixture(scope="module")
def reference(repo_root):
    bundle = load_bundle(repo_root / "models" / "reference", 1)
    return bundle, reference_of(bundle)


def test_the_reference_bundle_keeps_its_labs_cells_as_features_and_logits(reference):
    bundle, cells = reference
    assert set(cells.labs) == {"bccd", "pbc"} and set(cells.splits) == {"train", "val", "test"}
    assert cells.features.shape[1] == bundle.model.n_features and cells.logits.shape[1] == len(bundle.classes)
    test = cells.split("test")
    # the stored logits are the bundle's own: its held-out accuracy per lab, as bundle.json records it
    for lab in ("bccd", "pbc"):
        of = test.where(test.labs == lab)
        accuracy = np.mean(np.array(bundle.classes)[of.logits.argmax(1)] == of.labels)
        assert accuracy == pytest.approx(bundle.meta["metrics"]["by_lab"][lab]["int8"]["accuracy"], abs=1e-9)


def test_a_head_fitted_on_the_training_cells_classifies_the_held_out_ones(reference):
    bundle, cells = reference
    train, test = cells.split("train"), cells.split("test")
    index = {c: i for i, c in enumerate(bundle.classes)}
    head = fit_head(train.features, np.array([index[c] for c in train.labels]), bundle.classes)
    predicted = np.array(bundle.classes)[head.logits(test.features).argmax(1)]
    pbc = test.labs == "pbc"
    assert np.mean(predicted[pbc] == test.labels[pbc]) > 0.9  # 506 held-out PBC cells
    assert np.mean(predicted == np.array(bundle.classes)[test.logits.argmax(1)]) > 0.85  # near the model's own head


def test_head_and_reference_files_round_trip_and_refuse_what_does_not_fit(reference):
    bundle, cells = reference
    head = Head(np.ones((bundle.model.n_features, 2)), np.zeros(2), ("neutrophil", "lymphocyte"))
    again = Head.from_bytes(head.to_bytes(), bundle.model.n_features, head.classes)
    assert np.array_equal(again.weights, head.weights) and again.classes == head.classes
    with pytest.raises(ModelInvalid, match="classes .* disagree"):
        Head.from_bytes(head.to_bytes(), bundle.model.n_features, ("lymphocyte", "neutrophil"))
    with pytest.raises(ModelInvalid, match="do not fit 7 features"):
        Head.from_bytes(head.to_bytes(), 7, head.classes)
    with pytest.raises(ModelInvalid, match="not a classifier head"):
        Head.from_bytes(b"not an npz", bundle.model.n_features, head.classes)
    small = cells.where(np.arange(len(cells)) < 10)
    assert np.array_equal(ReferenceCells.from_bytes(small.to_bytes(), bundle.model.n_features).labels, small.labels)
    with pytest.raises(ModelInvalid, match="do not fit 10 cells of 3 features"):
        ReferenceCells.from_bytes(small.to_bytes(), 3)


def test_views_are_the_eight_rotations_and_mirror_images():
    crop = np.arange(2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 3)
    views = dihedral_views(crop, 8)
    assert views.shape == (8, 2, 2, 3) and len({v.tobytes() for v in views}) == 8
    assert np.array_equal(views[0], crop)


def test_verified_folders_are_read_with_their_labels_and_what_is_left_out_said(samples_pbc, tmp_path):
    cells, left = read_verified(samples_pbc)
    assert len(cells) == 16 and not left and {c.label for c in cells} >= {"neutrophil", "ig", "platelet"}
    site = tmp_path / "site"
    (site / "Neutrophils").mkdir(parents=True)
    (site / "unidentified").mkdir()
    shutil.copy(next((samples_pbc / "neutrophil").iterdir()), site / "Neutrophils")
    shutil.copy(next((samples_pbc / "monocyte").iterdir()), site / "unidentified")
    cells, left = read_verified(site)
    assert [c.label for c in cells] == ["neutrophil"] and "not a class to learn" in left[0][1]
    (site / "blast").mkdir()
    with pytest.raises(DataError, match="blast.* not a known cell class"):
        read_verified(site)
    with pytest.raises(DataError, match="not a folder"):
        read_verified(tmp_path / "missing")


def _adapt(repo_root, site, out, *extra):
    return train_main(["adapt", "--base", str(repo_root / "models" / "reference"), "--verified", str(site),
                       "--out", str(out), "--site", "test-site", "--threads", "1", "--min-cells", "2", *extra])


@pytest.fixture(scope="module")
def adapted_run(repo_root, samples_pbc, tmp_path_factory):
    """The reference bundle adapted to the 16 sample PBC cells, gate opened (plumbing, not accuracy)."""
    out = tmp_path_factory.mktemp("adapted") / "run"
    assert _adapt(repo_root, samples_pbc, out, "--max-original-drop", "100", "--min-macro-f1", "0") == 0
    return out


def test_adapt_writes_a_bundle_the_device_loads_and_names_its_base(repo_root, samples_pbc, adapted_run):
    printed = "\n".join(summary_lines(json.loads((adapted_run / "adapt.json").read_text())))
    assert "site cells" in printed and "bccd held-out" in printed and "pbc held-out" in printed
    base = load_bundle(repo_root / "models" / "reference", 1)
    adapted = load_bundle(adapted_run / "bundle", 1)
    assert adapted.head is not None and adapted.classes == base.classes
    lineage = adapted.meta["adaptation"]
    assert lineage["base_meta_sha256"] == base.meta["meta_sha256"] and lineage["site"] == "test-site"
    assert sum(lineage["site_cells"].values()) == 16 and len(lineage["site_cells_sha256"]) == 64
    assert len(adapted.novelty.centres) == len(base.novelty.centres) + 8  # the site's classes are familiar
    image = samples_pbc / "eosinophil" / sorted(p.name for p in (samples_pbc / "eosinophil").iterdir())[0]
    _, prediction = classify_cell_image(adapted, read_rgb(image), name=str(image))
    assert prediction.probabilities["eosinophil"] == max(prediction.probabilities.values())
    assert edge_main(["classify", "--model", str(adapted_run / "bundle"), "--json", str(image)]) == 0


def test_a_head_the_gate_refuses_writes_no_bundle_but_its_figures(repo_root, samples_pbc, tmp_path, capsys):
    assert _adapt(repo_root, samples_pbc, tmp_path / "run", "--min-macro-f1", "1.01") == 1
    assert "refused, no bundle written" in capsys.readouterr().err
    record = json.loads((tmp_path / "run" / "adapt.json").read_text())
    assert not record["gate"]["passed"] and not (tmp_path / "run" / "bundle").exists()


def test_the_loader_refuses_an_adapted_bundle_whose_head_was_changed(adapted_run, tmp_path):
    shutil.copytree(adapted_run / "bundle", tmp_path / "bundle")
    head = tmp_path / "bundle" / "head.npz"
    data = bytearray(head.read_bytes())
    data[-40] ^= 0xFF
    head.write_bytes(bytes(data))
    with pytest.raises(ModelInvalid, match="head.npz: sha256 .* does not match"):
        load_bundle(tmp_path / "bundle", 1)


def test_adapt_refuses_a_bundle_without_reference_cells(repo_root, samples_pbc, tmp_path, capsys):
    base = tmp_path / "old"
    shutil.copytree(repo_root / "models" / "reference", base)
    meta = json.loads((base / "bundle.json").read_text())
    meta.pop("reference_cells")
    from hematovision.edge.vision.bundle_meta import stamped
    (base / "bundle.json").write_text(json.dumps(stamped(meta)))
    code = train_main(["adapt", "--base", str(base), "--verified", str(samples_pbc), "--out", str(tmp_path / "r")])
    assert code == 1 and "has no reference_cells.npz" in capsys.readouterr().err


def test_unreadable_images_and_too_few_cells_are_named_and_nothing_is_written(repo_root, samples_pbc, tmp_path,
                                                                               capsys):
    site = tmp_path / "site"
    shutil.copytree(samples_pbc / "neutrophil", site / "neutrophil")
    shutil.copytree(samples_pbc / "lymphocyte", site / "lymphocyte")
    (site / "lymphocyte" / "broken.jpg").write_bytes(b"not a jpeg")
    assert _adapt(repo_root, site, tmp_path / "run") == 1
    err = capsys.readouterr().err
    assert "1 image(s) cannot be used" in err and "broken.jpg" in err and "Remove or replace them" in err
    assert not (tmp_path / "run").exists()
    (site / "lymphocyte" / "broken.jpg").unlink()
    code = train_main(["adapt", "--base", str(repo_root / "models" / "reference"), "--verified", str(site),
                       "--out", str(tmp_path / "run"), "--threads", "1"])
    err = capsys.readouterr().err
    assert code == 1 and "fewer than 5 verified cells per class (lymphocyte 2, neutrophil 2)" in err
    assert not (tmp_path / "run").exists()


def test_an_export_cells_folder_is_read_with_its_centres_and_pixel_sizes(repo_root, samples_pbc, tmp_path):
    """cells.csv as `hematovision-edge export-cells` writes it: the cut at the recorded centre and scale."""
    site = tmp_path / "site"
    rows = ["path,label,original_label,um_per_pixel,specimen_id,cell,operator,signed_at,bundle_name,"
            "bundle_meta_sha256,source_field,x_px,y_px"]
    for label in ("neutrophil", "eosinophil", "unidentified"):
        source = sorted((samples_pbc / ("monocyte" if label == "unidentified" else label)).iterdir())[0]
        (site / label).mkdir(parents=True)
        shutil.copy(source, site / label / source.name)
        h, w = read_rgb(source).shape[:2]
        rows.append(f"{label}/{source.name},{label},eosinophil,0.1,S-1,1,ana,2026-11-30T10:00:00+01:00,b,{'0' * 64},"
                    f"field-1.png,{w / 2},{h / 2}")
    (site / "cells.csv").write_text("\n".join(rows) + "\n")
    cells, left = read_verified(site)
    assert [(c.label, c.um_per_pixel, c.centre is not None) for c in cells] == \
        [("neutrophil", 0.1, True), ("eosinophil", 0.1, True)]
    assert len(left) == 1 and "labelled unidentified" in left[0][1]
    from hematovision.train.site_cells import site_features
    bundle = load_bundle(repo_root / "models" / "reference", 1)
    features = site_features(bundle, cells, views=2)
    assert features.features.shape == (2, 2, bundle.model.n_features) and not features.skipped


def test_an_adapted_bundle_installs_on_the_device_and_names_its_base(adapted_run, repo_root, tmp_path, capsys):
    state = tmp_path / "state"
    assert edge_main(["model", "install", str(adapted_run / "bundle"), "--state", str(state)]) == 0
    assert edge_main(["model", "status", "--state", str(state), "--json"]) == 0
    status = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    base_sha = load_bundle(repo_root / "models" / "reference", 1).meta["meta_sha256"]
    assert base_sha[:12] in json.dumps(status)
    installed = load_bundle(state / "models" / "current", 1)
    assert installed.head is not None and installed.meta["adaptation"]["site"] == "test-site"


def test_a_site_may_bring_a_class_the_base_lacks(tiny_bundle, samples_pbc, tmp_path):
    site = tmp_path / "site"
    for label in ("neutrophil", "basophil"):
        shutil.copytree(samples_pbc / label, site / label)
    assert train_main(["adapt", "--base", str(tiny_bundle), "--verified", str(site), "--out", str(tmp_path / "run"),
                       "--threads", "1", "--min-cells", "2", "--max-original-drop", "100", "--min-macro-f1", "0"]) == 0
    base, adapted = load_bundle(tiny_bundle, 1), load_bundle(tmp_path / "run" / "bundle", 1)
    assert "basophil" not in base.classes
    assert adapted.classes == tuple(c for c in KNOWN_CLASSES if c in set(base.classes) | {"basophil"})
    assert adapted.head.weights.shape == (base.model.n_features, len(adapted.classes))
    assert set(adapted.meta["metrics"]["by_lab"]) == {"bccd"}


def test_an_adapted_bundle_can_be_adapted_again_and_is_judged_against_itself(adapted_run, samples_pbc, tmp_path):
    first = load_bundle(adapted_run / "bundle", 1)
    kept = reference_of(first)
    assert np.array_equal(kept.logits.argmax(1), first.head.logits(kept.features).argmax(1))
    assert int(np.sum(kept.labs == "test-site")) == 16
    assert train_main(["adapt", "--base", str(adapted_run / "bundle"), "--verified", str(samples_pbc), "--out",
                       str(tmp_path / "again"), "--site", "again", "--threads", "1", "--min-cells", "2",
                       "--max-original-drop", "100", "--min-macro-f1", "0"]) == 0
    record = json.loads((tmp_path / "again" / "adapt.json").read_text())
    held = record["figures"]["original_held_out_by_lab"]
    assert set(held) == {"bccd", "pbc"}  # a site's cells are learned from, never held out
    assert load_bundle(tmp_path / "again" / "bundle", 1).meta["adaptation"]["base_meta_sha256"] == \
        first.meta["meta_sha256"]
