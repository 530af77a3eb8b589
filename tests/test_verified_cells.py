"""Verified cells: each cell of a signed report kept with its image in its field, and `export-cells`."""

from __future__ import annotations

import csv
import io
import json
import os
from datetime import datetime
from pathlib import Path

import cv2
import numpy as np
import pytest

from hematovision.crop import CropGeometry
from hematovision.edge.cli import main as edge_main
from hematovision.edge.config import load_config
from hematovision.edge.reports.export_cells import CSV_COLUMNS
from hematovision.edge.reports.files import safe_file_stem
from hematovision.edge.reports.verified_cells import PENDING, RECORDS, VERIFIED, write_cut
from hematovision.edge.service.cell_images import CellImages
from hematovision.edge.service.daemon import STATE_FILE, run_main
from hematovision.edge.service.specimens import StateSpecimens
from hematovision.edge.service.state import FrameRecord, NewCell, Store
from hematovision.edge.vision.field_cut import CUT_SIDES, cut_field
from hematovision.edge.web.folder import FolderSpecimens
from hematovision.errors import DataError
from hematovision.pixels import read_rgb

FIELDS = "BCCD/JPEGImages"


def read_png(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image is not None, path
    return image[:, :, ::-1]


def exported_rows(out: Path) -> list[dict]:
    text = (out / "cells.csv").read_text("utf-8")
    assert text.splitlines()[0] == ",".join(CSV_COLUMNS)
    return list(csv.DictReader(io.StringIO(text)))


# --- the cut ------------------------------------------------------------------------------------

def test_a_cut_is_three_crop_sides_around_the_cell_clipped_at_the_fields_edge():
    image = np.arange(400 * 600 * 3, dtype=np.uint32).reshape(400, 600, 3).astype(np.uint8)
    geometry = CropGeometry(side_um=20.0, input_size=64)  # 40 px at 0.5 um/px: cuts of 120 px
    middle = cut_field(image, (300.0, 200.0), 0.5, geometry)
    assert middle.image.shape == (120, 120, 3) and middle.origin == (240, 140)
    assert middle.centre_in_cut == (60.0, 60.0) and CUT_SIDES == 3.0
    assert np.array_equal(middle.image, image[140:260, 240:360])
    corner = cut_field(image, (10.0, 390.0), 0.5, geometry)
    assert corner.image.shape == (70, 70, 3)  # 60 px each way but 10 px to the left edge, 10 px to the bottom
    assert corner.origin == (0, 330) and corner.centre_in_cut == (10.0, 60.0)
    with pytest.raises(DataError, match="outside the 600x400 field"):
        cut_field(image, (600.0, 10.0), 0.5, geometry)


# --- the device ---------------------------------------------------------------------------------

def test_a_signed_report_keeps_each_cell_with_its_field_image_labels_signer_and_bundle(daemon_config, tiny_bundle,
                                                                                        samples_bccd, tmp_path, capsys):
    config_path = daemon_config()
    assert run_main(config_path) == 0
    state = load_config(config_path).state_dir()
    specimens = StateSpecimens(state / STATE_FILE, ("neutrophil",), lambda store, specimen: {})
    try:
        cells = specimens.report("S-1").cells
        assert len(cells) >= 3 and len(list((state / PENDING).rglob("*.png"))) == len(cells)
        specimens.change_cell("S-1", cells[0].id, "not_a_white_cell", "Bea")
        relabelled = "unidentified" if cells[1].label != "unidentified" else "neutrophil"
        specimens.change_cell("S-1", cells[1].id, relabelled, None)
        specimens.sign("S-1", "Ann Smith")
    finally:
        specimens.close()
    assert not (state / VERIFIED).exists()  # kept by the daemon, off the page's request
    assert run_main(config_path) == 0  # the replay is at its end; the daemon's first pass keeps the signed cells

    kept = json.loads((state / VERIFIED / "S-1" / RECORDS).read_text())["cells"]
    assert [c["cell"] for c in kept] == [c.id for c in cells]
    assert (kept[0]["label"], kept[0]["original_label"]) == ("not_a_white_cell", cells[0].label)
    assert (kept[1]["label"], kept[1]["original_label"]) == (relabelled, cells[1].label)
    assert all(c["label"] == c["original_label"] for c in kept[2:])
    bundle = json.loads((tiny_bundle / "bundle.json").read_text())
    assert {(c["operator"], c["bundle_name"], c["bundle_meta_sha256"], c["bundle_created_at"]) for c in kept} == \
        {("Ann Smith", bundle["name"], bundle["meta_sha256"], bundle["created_at"])}
    for record in kept:  # the cell's square of the frame itself, around its centre
        image = read_png(state / VERIFIED / "S-1" / record["image"])
        field = read_rgb(samples_bccd / FIELDS / record["source_field"])
        x0, y0 = record["origin_x_px"], record["origin_y_px"]
        assert np.array_equal(image, field[y0:y0 + image.shape[0], x0:x0 + image.shape[1]])
        side = CUT_SIDES * bundle["crop_geometry"]["side_um"] / record["um_per_pixel"]
        assert max(image.shape[:2]) <= round(side) + 1
        assert 0 <= record["x_px"] - x0 < image.shape[1] and 0 <= record["y_px"] - y0 < image.shape[0]
    assert not list((state / PENDING).iterdir())  # the waiting cuts are gone once kept

    out = tmp_path / "export"
    assert edge_main(["export-cells", "--state", str(state), "--out", str(out)]) == 0
    rows = exported_rows(out)
    assert [int(r["cell"]) for r in rows] == [c["cell"] for c in kept]
    for row, record in zip(rows, kept):
        assert row["path"] == f"{record['label']}/S-1_{record['cell']}.png" and (out / row["path"]).is_file()
        assert (row["label"], row["original_label"], row["operator"], row["source_field"]) == \
            (record["label"], record["original_label"], "Ann Smith", record["source_field"])
        assert float(row["x_px"]) == pytest.approx(record["x_px"] - record["origin_x_px"], abs=0.05)
        assert float(row["um_per_pixel"]) == pytest.approx(record["um_per_pixel"], rel=1e-5)
    assert (out / "not_a_white_cell" / f"S-1_{cells[0].id}.png").is_file()
    assert (out / "unidentified").is_dir()

    capsys.readouterr()
    assert edge_main(["export-cells", "--state", str(state), "--out", str(out)]) == 1
    assert "not empty; give a new folder, or --force" in capsys.readouterr().err
    assert edge_main(["export-cells", "--state", str(state), "--out", str(out), "--force"]) == 0
    assert edge_main(["export-cells", "--state", str(state), "--out", str(tmp_path / "none"), "--specimen", "S-9"]) == 1
    assert "none of the" in capsys.readouterr().err and not (tmp_path / "none").exists()


def test_export_cells_says_where_cells_are_looked_for_when_none_is_kept(tmp_path, capsys):
    (tmp_path / "state").mkdir()
    assert edge_main(["export-cells", "--state", str(tmp_path / "state"), "--out", str(tmp_path / "out")]) == 1
    assert "no verified cells kept" in capsys.readouterr().err
    assert edge_main(["export-cells", "--out", str(tmp_path / "out"), "--config", str(tmp_path / "no.toml")]) == 1
    assert "cannot read the configuration" in capsys.readouterr().err


def _specimen_with_cut(store: Store, root: Path, specimen_id: str, kilobytes: int, finish: bool = True):
    """A specimen of one counted cell whose cut (a real PNG of noise, about `kilobytes`) waits for sign-off."""
    specimen = store.start_specimen(specimen_id, 100)
    side = int((kilobytes * 1024 / 3) ** 0.5)
    pixels = np.random.default_rng(len(specimen_id)).integers(0, 256, (side, side, 3), dtype=np.uint8)
    cut = cut_field(pixels, (side / 2, side / 2), 1.0, CropGeometry(side_um=side, input_size=8))
    written = CellImages(root, 0).write(specimen, 0, [cut])[0]
    cell = NewCell(1.0, 1.0, "neutrophil", 0.9, (0, 0, 4, 4), b"\0", "f.png", False, side / 2, side / 2, 1.0,
                   written.file, written.origin)
    store.record_frame(FrameRecord(specimen, "replay:x", 0, "used", (cell,), 0, None))
    if finish:
        store.finish_specimen(store.specimen(specimen_id), "end of replay", {"specimen_id": specimen_id})
    return specimen


def test_cell_images_above_their_limit_go_oldest_first_unsigned_before_verified_never_the_open_one(tmp_path):
    root = tmp_path / "state"
    with Store(root / STATE_FILE) as store:
        old = _specimen_with_cut(store, root, "OLD", 300)
        newer = _specimen_with_cut(store, root, "NEWER", 300)
        verified = root / VERIFIED / "SIGNED"
        write_cut(verified, "1.png", cut_field(np.zeros((300, 300, 3), np.uint8) + 7, (150, 150), 1.0,
                                               CropGeometry(side_um=300, input_size=8)))
        (verified / RECORDS).write_text("{}")
        for age, folder in ((3000, root / PENDING / str(old.row)), (2000, verified),
                            (1000, root / PENDING / str(newer.row))):
            os.utime(folder, (folder.stat().st_mtime - age,) * 2)
        counting = _specimen_with_cut(store, root, "OPEN", 300, finish=False)
        pending = {s: root / PENDING / str(s.row) for s in (old, newer, counting)}

        total = sum(p.stat().st_size for p in root.rglob("*.png"))
        CellImages(root, total - 1).prune(store)  # one folder too many: the oldest never signed
        assert not pending[old].exists() and pending[newer].exists() and verified.exists()
        CellImages(root, 1).prune(store)  # then the rest never signed, then verified ones; never the open one
        assert not pending[newer].exists() and not verified.exists() and pending[counting].exists()


def test_the_cuts_of_a_pruned_specimen_go_with_its_cells(tmp_path):
    from hematovision.edge.service.state import PruneSettings

    root = tmp_path / "state"
    with Store(root / STATE_FILE) as store:
        specimen = _specimen_with_cut(store, root, "OLD", 50)
        store.mark_report(store.pending_reports(True, False)[0], files=True)
        assert store.prune(PruneSettings(keep_days=0.0), files=True, link=False) == 1
        CellImages(root, 2**30).prune(store)
        assert not (root / PENDING / str(specimen.row)).exists()


def test_a_specimen_counted_without_cell_images_keeps_none(daemon_config, tmp_path):
    config_path = daemon_config(state={"cell_images": False})
    assert run_main(config_path) == 0
    state = load_config(config_path).state_dir()
    assert not (state / PENDING).exists()
    with Store(state / STATE_FILE) as store:
        assert {c.cut for _, c in store.cells(store.specimen("S-1"))} == {""}


# --- a desktop ----------------------------------------------------------------------------------

def test_a_report_counted_and_signed_on_a_desktop_keeps_its_cells_for_export(tiny_bundle, samples_bccd, tmp_path):
    reports = tmp_path / "reports"
    assert edge_main(["count", "--model", str(tiny_bundle), str(samples_bccd / FIELDS), "--report", str(reports),
                      "--specimen-id", "D/1", "--all"]) == 0
    stem = safe_file_stem("D/1")
    folder = FolderSpecimens(reports)
    cells = folder.report("D/1").cells
    assert len(list((reports / PENDING / stem).glob("*.png"))) == len(cells) > 0
    assert not [p for p in (reports / PENDING).iterdir() if p.name.startswith(".")]
    folder.change_cell("D/1", cells[-1].id, "not_a_white_cell", "Bo")
    folder.sign("D/1", "Bo")
    kept = json.loads((reports / VERIFIED / stem / RECORDS).read_text())["cells"]
    assert len(kept) == len(cells) and kept[-1]["label"] == "not_a_white_cell"
    assert not (reports / PENDING / stem).exists()
    first = read_png(reports / VERIFIED / stem / kept[0]["image"])
    field = read_rgb(samples_bccd / FIELDS / kept[0]["source_field"])
    y0, x0 = kept[0]["origin_y_px"], kept[0]["origin_x_px"]
    assert np.array_equal(first, field[y0:y0 + first.shape[0], x0:x0 + first.shape[1]])

    out = tmp_path / "export"
    assert edge_main(["export-cells", "--reports", str(reports), "--out", str(out), "--specimen", "D/1",
                      "--since", "2000-01-01"]) == 0
    rows = exported_rows(out)
    assert len(rows) == len(cells) and rows[-1]["path"] == f"not_a_white_cell/{stem}_{cells[-1].id}.png"


def test_a_desktop_count_without_cell_images_is_signed_with_none_kept(tiny_bundle, samples_bccd, tmp_path):
    reports = tmp_path / "reports"
    assert edge_main(["count", "--model", str(tiny_bundle), str(samples_bccd / FIELDS), "--report", str(reports),
                      "--specimen-id", "D-2", "--no-cell-images"]) == 0
    assert not (reports / PENDING).exists()
    FolderSpecimens(reports).sign("D-2", "Bo")
    assert (reports / "D-2.verified.json").is_file() and not (reports / VERIFIED).exists()


def test_a_count_that_fails_leaves_no_cut_behind(tiny_bundle, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    reports = tmp_path / "reports"
    assert edge_main(["count", "--model", str(tiny_bundle), str(broken), "--report", str(reports)]) == 1
    assert not (reports / PENDING).exists() or not list((reports / PENDING).iterdir())


def test_a_desktop_sign_off_cut_short_before_its_cells_were_kept_keeps_them_when_the_page_opens(
        tiny_bundle, samples_bccd, tmp_path):
    from hematovision.edge.reports import review
    from hematovision.edge.reports.files import write_report_files

    reports = tmp_path / "reports"
    assert edge_main(["count", "--model", str(tiny_bundle), str(samples_bccd / FIELDS), "--report", str(reports),
                      "--specimen-id", "D-3"]) == 0
    folder = FolderSpecimens(reports)
    signed = review.sign(folder.report("D-3"), (), "Cy", datetime.now())
    write_report_files(signed, reports)  # the sign-off's files, and then the power went
    assert not (reports / VERIFIED).exists()
    FolderSpecimens(reports).keep_waiting_cells()  # what `hematovision-edge web DIR` does first
    kept = json.loads((reports / VERIFIED / "D-3" / RECORDS).read_text())["cells"]
    assert len(kept) == len(signed.cells) and {c["operator"] for c in kept} == {"Cy"}
