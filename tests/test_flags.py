"""Specimen flags: what is wrong and what to do, judged from cells, frames, colours and scale, and carried
by every output (count --json and table, report JSON / HTML / CSV, ASTM, the daemon's status and state)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import sqlite3
import threading

import numpy as np
import pytest

from conftest import stop_sessions_after, toml_text
from hematovision.calibration.colour import colour_summary, lab_to_rgb, rgb_to_lab, stain_stats
from hematovision.edge.cli import main as edge_main
from hematovision.edge.config import ChecksConfig, load_config
from hematovision.edge.counting.checks import (DIFFERENTIAL_REVIEW, FULL_REVIEW, FULL_REVIEW_BANNER, LOW_FOCUS,
                                               OUTSIDE_TRAINING, REVIEW, TARGET_NOT_REACHED, TOO_MANY_UNIDENTIFIED,
                                               ColourSums, Evidence, Flag, TrainingRange, specimen_flags,
                                               stain_cause)
from hematovision.edge.counting.tally import make_tally
from hematovision.edge.links.astm import parse_message
from hematovision.edge.reports.report import Report, ReportInvalid
from hematovision.edge.service.daemon import STATE_FILE, Daemon, open_pipeline
from hematovision.edge.service.state import SCHEMA_VERSION, FrameRecord, NewCell, StateError, Store
from hematovision.edge.vision.bundle_meta import StainRange
from hematovision.edge.vision.model_bundle import load_bundle
from hematovision.edge.vision.pipeline import FieldPipeline
from hematovision.errors import ConfigError, ModelInvalid
from hematovision.pixels import read_rgb
from test_astm import PtyHost
from test_astm import _send as send_astm
from test_daemon import RecordingNotifier, write_config

CLASSES = ("neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil")
NORMAL = {"neutrophil": 60, "lymphocyte": 30, "monocyte": 6, "eosinophil": 3, "basophil": 1}
BCCD_LIKE = StainRange("bccd", 180, (73.3, 4.9, -1.1, 7.9, 8.6, 10.8), (1.35, 1.21, 1.54, 0.71, 1.16, 1.57))
PBC_LIKE = StainRange("pbc", 200, (79.0, 11.1, 6.7, 16.0, 9.3, 14.7), (2.94, 1.56, 3.68, 2.1, 1.58, 2.5))
TRAINED = TrainingRange((BCCD_LIKE,), 0.072, novelty=True)


def colour_of(*summaries) -> ColourSums:
    sums = ColourSums()
    for summary in summaries:
        sums = sums.add(summary)
    return sums


def evidence(counts=NORMAL, target: int = 100, **changes) -> Evidence:
    base = dict(tally=make_tally(counts, CLASSES, target), classified=sum(counts.values()), unfamiliar=0,
                frames_used=80, colour=colour_of(BCCD_LIKE.mean, BCCD_LIKE.mean), um_per_pixel=0.075)
    return Evidence(**{**base, **changes})


def codes(flags) -> list[str]:
    return [f.code for f in flags]


# --- the checks, pure ---------------------------------------------------------------------

def test_a_typical_specimen_inside_the_training_range_raises_no_flag():
    assert specimen_flags(evidence(), TRAINED) == ()


def test_many_unfamiliar_cells_alone_put_the_specimen_outside_training():
    flags = specimen_flags(evidence(unfamiliar=30), TRAINED)
    assert codes(flags) == [OUTSIDE_TRAINING] and flags[0].severity == FULL_REVIEW
    message = flags[0].message
    assert message.startswith("Outside what the model was validated on: 30% of cells (30 of 100) look unlike")
    assert "Verify every cell before reporting" in message
    assert "stain colours" not in message and "coarser" not in message


@pytest.mark.parametrize("changes, training", [
    (dict(unfamiliar=30), TrainingRange((BCCD_LIKE,), 0.072, novelty=False)),  # no novelty model: no unfamiliar cell
    (dict(unfamiliar=15), TRAINED),  # 15%: not more than the limit
    (dict(counts={"neutrophil": 12, "lymphocyte": 7}, unfamiliar=10, target=19), TRAINED),  # 19 cells: too few to judge
])
def test_unfamiliar_cells_count_only_with_a_novelty_model_above_the_share_and_with_enough_cells(changes, training):
    assert OUTSIDE_TRAINING not in codes(specimen_flags(evidence(**changes), training))


def test_stain_colours_far_from_the_training_lab_put_the_specimen_outside_training():
    darker = (63.0, *BCCD_LIKE.mean[1:])  # lightness 7.6 of its standard deviations below the lab's
    flag, = specimen_flags(evidence(colour=colour_of(darker, darker)), TRAINED)
    assert flag.code == OUTSIDE_TRAINING
    assert "stain colours outside the training range (lightness 63, trained 68-79)" in flag.message
    assert "calibrate colour (hematovision-calibrate colour)" in flag.message
    assert "yellow tint" not in flag.message  # only the channels out of range are named


def test_a_specimen_close_to_any_one_training_lab_is_inside_the_stain_range():
    two_labs = TrainingRange((BCCD_LIKE, PBC_LIKE), 0.09, novelty=True)
    assert specimen_flags(evidence(colour=colour_of(PBC_LIKE.mean)), two_labs) == ()
    between = tuple((a + b) / 2 for a, b in zip(BCCD_LIKE.mean, PBC_LIKE.mean))  # within 2 of pbc's sd
    assert specimen_flags(evidence(colour=colour_of(between)), two_labs) == ()
    dark = (60.0, 8.0, 3.0, 12.0, 9.0, 12.7)  # 6.5 of pbc's sd, 9.9 of bccd's, too dark
    flag, = specimen_flags(evidence(colour=colour_of(dark)), two_labs)
    assert "(nearest training lab pbc: lightness 60, trained 67-91)" in flag.message


def test_no_stain_check_without_frames_or_without_a_stain_range_in_the_bundle():
    far = (40.0, 30.0, 30.0, 20.0, 20.0, 20.0)
    assert stain_cause(evidence(colour=ColourSums()), TRAINED, ChecksConfig()) is None
    assert stain_cause(evidence(colour=colour_of(far)), TrainingRange((), 0.072, True), ChecksConfig()) is None


@pytest.mark.parametrize("um, trained, flagged", [(0.2, 0.072, True), (0.14, 0.072, False), (None, 0.072, False),
                                                  (float("nan"), 0.072, False), (0.2, None, False)])
def test_a_pixel_size_over_twice_the_trained_one_puts_the_specimen_outside_training(um, trained, flagged):
    flags = specimen_flags(evidence(um_per_pixel=um), TrainingRange((BCCD_LIKE,), trained, True))
    assert (OUTSIDE_TRAINING in codes(flags)) is flagged
    if flagged:
        assert "cells imaged 2.8x coarser than the model was trained at (0.200 um per pixel, trained 0.072)" \
            in flags[0].message and "hematovision-calibrate micrometer" in flags[0].message


def test_several_causes_are_named_in_one_flag_each_with_its_fix():
    far = (60.0, 15.0, 10.0, 7.9, 8.6, 10.8)
    flags = specimen_flags(evidence(unfamiliar=40, colour=colour_of(far), um_per_pixel=0.3), TRAINED)
    assert codes(flags) == [OUTSIDE_TRAINING]
    message = flags[0].message
    findings = ["40% of cells (40 of 100) look unlike the training cells", "stain colours outside the training range",
                "cells imaged 4.2x coarser"]
    assert [message.index(f) for f in findings] == sorted(message.index(f) for f in findings)
    for fix in ("Verify every cell", "look for abnormal cells", "hematovision-calibrate colour",
                "hematovision-calibrate micrometer"):
        assert fix in message


def test_a_differential_far_outside_the_adult_intervals_is_flagged_for_review_and_left_unchanged():
    counts = {"neutrophil": 10, "lymphocyte": 5, "monocyte": 3, "eosinophil": 82}
    before = make_tally(counts, CLASSES, 100)
    flags = specimen_flags(evidence(counts), TRAINED)
    assert codes(flags) == [DIFFERENTIAL_REVIEW] and flags[0].severity == REVIEW
    assert "neutrophils 10% (95% CI 5-18; adult reference 40-75%)" in flags[0].message
    assert "eosinophils 82%" in flags[0].message and "lymphocytes" in flags[0].message
    assert "monocytes" not in flags[0].message  # 3%: its interval reaches 2-10
    assert evidence(counts).tally == before  # flagged for review, never changed


def test_a_class_whose_interval_reaches_its_reference_range_is_not_flagged():
    few = {"neutrophil": 1, "lymphocyte": 2, "eosinophil": 1}  # 25% eosinophils of 4 cells: the interval is wide
    assert DIFFERENTIAL_REVIEW not in codes(specimen_flags(evidence(few, target=4), TRAINED))


def test_unidentified_blur_and_target_flags_say_what_was_found_and_what_to_do():
    counts = {**NORMAL, "neutrophil": 20, "unidentified": 20}
    flags = specimen_flags(evidence(counts, target=100, frames_used=10, frames_blur=30), TRAINED)
    assert codes(flags) == [TOO_MANY_UNIDENTIFIED, LOW_FOCUS, TARGET_NOT_REACHED]
    unidentified, focus, target = (f.message for f in flags)
    assert unidentified.startswith("20 of 80 counted cells (25%) are unidentified, more than 10%: verify them")
    assert focus.startswith("Only 10 of 40 frames were sharp enough to count (30 blurred): focus the microscope")
    assert target.startswith("Only 60 of the 100 target cells were identified: count more fields")


def test_flags_are_listed_worst_first():
    counts = {"neutrophil": 5, "eosinophil": 10, "unidentified": 10}
    flags = specimen_flags(evidence(counts, unfamiliar=10), TRAINED)
    assert codes(flags) == [OUTSIDE_TRAINING, DIFFERENTIAL_REVIEW, TOO_MANY_UNIDENTIFIED, TARGET_NOT_REACHED]


def test_limits_come_from_the_checks_table_of_the_configuration(tmp_path, tiny_bundle):
    (tmp_path / "frames").mkdir()
    path = tmp_path / "config.toml"
    path.write_text(toml_text({"model": {"bundle": str(tiny_bundle)}, "source.replay": {"path": "frames"},
                               "checks": {"max_unfamiliar_share": 0.5, "max_pixel_size_ratio": 5.0}}))
    limits = load_config(path).checks
    assert specimen_flags(evidence(unfamiliar=30, um_per_pixel=0.3), TRAINED, limits) == ()
    path.write_text(path.read_text() + "stain_sd_limit = 0.0\n")
    with pytest.raises(ConfigError, match=r"checks\.stain_sd_limit = 0\.0 is out of range"):
        load_config(path)


# --- colour of real fields -------------------------------------------------------------------

def sample_fields(samples_bccd, n: int | None = None):
    return [read_rgb(p) for p in sorted((samples_bccd / "BCCD" / "JPEGImages").glob("*.jpg"))[:n]]


def hue_rotated(image, degrees: float):
    lab = rgb_to_lab(image)
    t = np.deg2rad(degrees)
    a, b = lab[..., 1].copy(), lab[..., 2].copy()
    lab[..., 1], lab[..., 2] = a * np.cos(t) - b * np.sin(t), a * np.sin(t) + b * np.cos(t)
    return lab_to_rgb(lab)


def white_balance_error(image, gains=(1.0, 0.85, 0.7)):
    return np.clip(image * np.asarray(gains) + 0.5, 0, 255).astype(np.uint8)


def test_a_fields_colour_summary_is_its_stain_statistics(samples_bccd):
    for image in sample_fields(samples_bccd, 5):
        stats = stain_stats([image])
        assert np.allclose(colour_summary(image), (*stats.lab_mean, *stats.lab_std), atol=0.3)


@pytest.mark.parametrize("shift", [lambda im: hue_rotated(im, 180), white_balance_error],
                         ids=["hue rotated 180 degrees", "white balance error"])
def test_a_strong_colour_shift_of_real_fields_lies_outside_the_range_built_from_them(samples_bccd, shift):
    fields = sample_fields(samples_bccd)
    summaries = np.array([colour_summary(im) for im in fields])
    training = TrainingRange((StainRange("samples", len(fields), tuple(summaries.mean(0)), tuple(summaries.std(0))),),
                             0.072, True)
    assert stain_cause(evidence(colour=colour_of(*summaries)), training, ChecksConfig()) is None
    shifted = colour_of(*(colour_summary(shift(im)) for im in fields))
    cause = stain_cause(evidence(colour=shifted), training, ChecksConfig())
    assert cause is not None and "stain colours outside the training range" in cause.finding


def test_cells_of_another_lab_lie_outside_the_stain_range_of_the_sample_fields(samples_bccd, samples_pbc):
    summaries = np.array([colour_summary(im) for im in sample_fields(samples_bccd)])
    bccd = StainRange("bccd", len(summaries), tuple(summaries.mean(0)), tuple(summaries.std(0)))
    pbc_frames = colour_of(*(colour_summary(read_rgb(p)) for p in sorted(samples_pbc.glob("*/*.jpg"))))
    cause = stain_cause(evidence(colour=pbc_frames), TrainingRange((bccd,), 0.072, True), ChecksConfig())
    assert cause is not None and "contrast (spread of lightness)" in cause.finding  # PBC's fields: paler, more contrast
    pbc = StainRange("pbc", 16, pbc_frames.mean, (2.0,) * 6)
    both = TrainingRange((bccd, pbc), 0.072, True)
    assert stain_cause(evidence(colour=pbc_frames), both, ChecksConfig()) is None  # a lab it was trained on


def test_the_pipeline_summarises_each_used_frames_colour(tiny_bundle, samples_bccd):
    image = sample_fields(samples_bccd, 1)[0]
    result = FieldPipeline(load_bundle(tiny_bundle, 1)).process(image)
    assert result.kind == "used" and result.colour == colour_summary(image)


# --- the bundle's training range ---------------------------------------------------------------

def test_the_bundle_stain_range_is_read_checked_and_optional(foreign_stain_bundle, repo_root, tmp_path):
    from conftest import FOREIGN_STAIN, edited_bundle

    bundle = load_bundle(foreign_stain_bundle, 1)
    mean, sd = tuple(FOREIGN_STAIN["mean"]), tuple(FOREIGN_STAIN["sd"])
    assert bundle.stain_range == (StainRange("elsewhere", 50, mean, sd),)
    assert TrainingRange.of(bundle).novelty and TrainingRange.of(bundle).um_per_pixel == bundle.trained_um_per_pixel
    assert [r.lab for r in load_bundle(repo_root / "models" / "reference", 1).stain_range] == ["bccd", "pbc"]
    older = edited_bundle(foreign_stain_bundle, tmp_path / "older", lambda meta: meta.pop("stain_range"))
    assert load_bundle(older, 1).stain_range == ()  # a bundle made before stain ranges

    def short_sd(meta):
        meta["stain_range"]["elsewhere"]["sd"] = [1.0] * 5

    broken = edited_bundle(foreign_stain_bundle, tmp_path / "broken", short_sd)
    with pytest.raises(ModelInvalid, match=r"stain_range\.elsewhere\.sd = .* must be 6 numbers"):
        load_bundle(broken, 1)


# --- every output ---------------------------------------------------------------------------

def _json_lines(capsys):
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]


def test_count_json_summary_carries_each_flag_with_its_message(tiny_bundle, samples_bccd, capsys):
    fields = sorted((samples_bccd / "BCCD" / "JPEGImages").glob("*.jpg"))[:4]
    assert edge_main(["count", "--model", str(tiny_bundle), "--json", *map(str, fields)]) == 0
    summary = _json_lines(capsys)[-1]["summary"]
    assert all(set(f) == {"code", "message"} for f in summary["flags"])
    target = [f for f in summary["flags"] if f["code"] == TARGET_NOT_REACHED]
    assert target and target[0]["message"].startswith(f"Only {summary['identified']} of the 100 target cells")
    assert OUTSIDE_TRAINING not in [f["code"] for f in summary["flags"]]  # the bundle was trained on these fields


@pytest.fixture(scope="module")
def outside_report(foreign_stain_bundle, samples_bccd, tmp_path_factory):
    """count --report of the sample fields with a bundle trained on a lab stained unlike them."""
    folder = tmp_path_factory.mktemp("outside")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert edge_main(["count", "--model", str(foreign_stain_bundle), str(samples_bccd / "BCCD" / "JPEGImages"),
                          "--report", str(folder), "--specimen-id", "S-OUT"]) == 0
    return folder, out.getvalue()


def test_a_specimen_outside_the_training_stain_is_flagged_first_in_count_json(foreign_stain_bundle, samples_bccd,
                                                                             capsys):
    fields = sorted((samples_bccd / "BCCD" / "JPEGImages").glob("*.jpg"))[:3]
    assert edge_main(["count", "--model", str(foreign_stain_bundle), "--json", *map(str, fields)]) == 0
    flags = _json_lines(capsys)[-1]["summary"]["flags"]
    assert flags[0]["code"] == OUTSIDE_TRAINING
    assert re.search(r"stain colours outside the training range \(lightness 7\d, trained 47-63;", flags[0]["message"])


def test_the_count_table_ends_with_the_banner_and_every_flags_message(outside_report):
    _, table = outside_report
    tail = table[table.index("Flags:") - 60:]
    assert f"*** {FULL_REVIEW_BANNER.upper()} ***\nFlags:\n- Outside what the model was validated on:" in tail


def test_the_report_json_html_and_csv_say_every_cell_must_be_verified(outside_report):
    folder, _ = outside_report
    data = json.loads((folder / "S-OUT.json").read_text())
    assert data["needs_full_review"] is True and data["quality_flags"][0] == OUTSIDE_TRAINING
    assert [f["code"] for f in data["flags"]] == data["quality_flags"]
    assert Report.from_dict(data).flags[0].severity == FULL_REVIEW
    html = (folder / "S-OUT.html").read_text()
    banner = html.index(f'id="full-review">{FULL_REVIEW_BANNER}</p>')
    assert banner < html.index('id="flags"') < html.index("<h2>Run</h2>")
    assert "Outside what the model was validated on: " in html and "stain colours outside the training range" in html
    first, header = (folder / "S-OUT.csv").read_text("utf-8-sig").splitlines()[:2]
    assert first.startswith('"NEEDS FULL REVIEW: EVERY CELL MUST BE VERIFIED. Outside what the model')
    assert header.startswith("specimen_id,class,count")
    rows = list(csv.reader(io.StringIO((folder / "S-OUT.csv").read_text("utf-8-sig"))))
    assert len(rows[0]) == 1 and rows[1][0] == "specimen_id"


def test_the_astm_message_carries_the_banner_and_every_flag_as_comments(outside_report):
    folder, _ = outside_report
    report = Report.from_dict(json.loads((folder / "S-OUT.json").read_text()))
    with PtyHost() as host:
        send_astm(host, report)
    got = parse_message(host.receiver.messages[0])
    assert got.comments[0] == ("needs_full_review", FULL_REVIEW_BANNER)
    assert got.comments[1:] == tuple((f.code, f.message) for f in report.flags)
    assert got.comments[1][0] == OUTSIDE_TRAINING


def test_a_report_written_before_flag_messages_still_loads(outside_report):
    folder, _ = outside_report
    old = json.loads((folder / "S-OUT.json").read_text())
    del old["flags"], old["needs_full_review"]
    report = Report.from_dict(old)
    assert report.quality_flags == tuple(old["quality_flags"]) and report.needs_full_review
    assert report.flags[0] == Flag.of(OUTSIDE_TRAINING)
    assert report.flags[0].message.startswith("Outside what the model was validated on.")


@pytest.mark.parametrize("change, words", [
    (lambda d: d["flags"].pop(), "are not its quality_flags"),
    (lambda d: d.update(needs_full_review=False), "needs_full_review is False"),
    (lambda d: d["flags"][0].update(message="two\nlines"), "message"),
])
def test_a_report_whose_flags_disagree_is_refused(outside_report, change, words):
    folder, _ = outside_report
    data = json.loads((folder / "S-OUT.json").read_text())
    change(data)
    with pytest.raises(ReportInvalid, match=re.escape(words)):
        Report.from_dict(data)


# --- the daemon: status and state ------------------------------------------------------------

def evidence_rows(state_dir):
    db = sqlite3.connect(state_dir / STATE_FILE)
    try:
        specimen = db.execute("SELECT fields, colour_frames, colour_sums, um_per_pixel FROM specimens").fetchall()
        cells = db.execute("SELECT frame, seq, label, unfamiliar FROM cells ORDER BY id").fetchall()
        report = json.loads(db.execute("SELECT report FROM outbox").fetchone()[0])
    finally:
        db.close()
    return specimen, cells, {k: report[k] for k in ("flags", "quality_flags", "needs_full_review")}


def run_in_process(config, stop_after: int | None = None, monkeypatch=None) -> RecordingNotifier:
    """Run the daemon in this process; with stop_after, each session ends after that many frames (as SIGTERM)."""
    if stop_after is not None:
        stop_sessions_after(monkeypatch, stop_after)
    cfg = load_config(config)
    stop = threading.Event()
    notifier = RecordingNotifier(stop)
    with Store(cfg.state_dir() / STATE_FILE, cfg.state.min_free_mb * 2**20) as store:
        assert Daemon(cfg, open_pipeline(cfg), store, notifier, stop).run() == 0
    return notifier


def test_the_specimen_evidence_survives_restarts_neither_lost_nor_counted_twice(tmp_path, unfamiliar_bundle,
                                                                                samples_bccd, monkeypatch):
    frames = samples_bccd / "BCCD" / "JPEGImages"
    whole = run_in_process(write_config(tmp_path / "whole", unfamiliar_bundle, frames))
    expected = evidence_rows(tmp_path / "whole" / "state")
    (fields, colour_frames, sums, um), = expected[0]
    assert fields == colour_frames == 34 and len(json.loads(sums)) == 6 and 0.05 < um < 0.12
    assert expected[1] and all(unfamiliar == 1 for *_, unfamiliar in expected[1])
    assert expected[2]["needs_full_review"] and expected[2]["quality_flags"][0] == OUTSIDE_TRAINING
    assert "look unlike the training cells; stain colours outside" in expected[2]["flags"][0]["message"]
    counting = [s for s in whole.statuses if s.startswith("specimen S-1:")]
    assert any("; Outside what the model was validated on:" in s for s in counting)
    assert whole.statuses[-1].startswith("STOPPING stopped; no specimen open; last: specimen S-1 finished "
                                         "(end of replay): 0/100000 cells")
    assert "Outside what the model was validated on" in whole.statuses[-1]

    resumed = write_config(tmp_path / "resumed", unfamiliar_bundle, frames)
    for _ in range(20):  # sessions of five frames each, as if stopped by SIGTERM every five frames
        run_in_process(resumed, 5, monkeypatch)
        if finished(tmp_path / "resumed" / "state"):
            break
    assert evidence_rows(tmp_path / "resumed" / "state") == expected


def finished(state_dir) -> bool:
    with Store(state_dir / STATE_FILE) as store:
        return store.open_specimen() is None and store.last_finished() is not None


# The state database as version 1 wrote it (specimens and cells: the tables later versions add columns to).
VERSION_1 = """
CREATE TABLE specimens (id INTEGER PRIMARY KEY, specimen_id TEXT NOT NULL UNIQUE,
    target INTEGER NOT NULL CHECK (target > 0), status TEXT NOT NULL CHECK (status IN ('open', 'finished')),
    started_at TEXT NOT NULL, finished_at TEXT, finish_reason TEXT, fields INTEGER NOT NULL DEFAULT 0,
    skipped_blur INTEGER NOT NULL DEFAULT 0, skipped_motion INTEGER NOT NULL DEFAULT 0,
    unusable INTEGER NOT NULL DEFAULT 0, edge_cells INTEGER NOT NULL DEFAULT 0, tracker_state TEXT);
CREATE UNIQUE INDEX one_open_specimen ON specimens (status) WHERE status = 'open';
CREATE TABLE cells (id INTEGER PRIMARY KEY, specimen INTEGER NOT NULL REFERENCES specimens (id),
    frame INTEGER NOT NULL, seq INTEGER NOT NULL, x_um REAL NOT NULL, y_um REAL NOT NULL, label TEXT NOT NULL,
    confidence REAL NOT NULL, bbox TEXT NOT NULL, thumbnail BLOB NOT NULL, UNIQUE (specimen, frame, seq));
INSERT INTO specimens (specimen_id, target, status, started_at, fields, skipped_blur, edge_cells)
    VALUES ('S-OLD', 100, 'open', '2025-01-02T03:04:05+00:00', 7, 2, 3);
INSERT INTO cells (specimen, frame, seq, x_um, y_um, label, confidence, bbox, thumbnail) VALUES
    (1, 0, 0, 1.0, 2.0, 'neutrophil', 0.9, '[0, 0, 8, 8]', x'00'),
    (1, 0, 1, 3.0, 4.0, 'neutrophil', 0.8, '[8, 8, 16, 16]', x'00'),
    (1, 1, 0, 5.0, 6.0, 'lymphocyte', 0.7, '[0, 0, 8, 8]', x'00');
PRAGMA user_version = 1;
"""


def test_a_version_1_state_database_is_upgraded_in_place_with_its_counts_intact(tmp_path):
    path = tmp_path / STATE_FILE
    db = sqlite3.connect(path)
    db.executescript(VERSION_1)
    db.close()
    with Store(path) as store:
        specimen = store.open_specimen()
        assert (specimen.specimen_id, specimen.fields, specimen.skipped_blur, specimen.edge_cells) == ("S-OLD", 7, 2, 3)
        assert (specimen.colour_frames, specimen.colour_sums, specimen.um_per_pixel) == (0, None, None)
        assert store.label_counts(specimen) == {"neutrophil": 2, "lymphocyte": 1}
        assert store.unfamiliar_count(specimen) == 0  # cells counted before had no novelty score
        cell = NewCell(7.0, 8.0, "unidentified", 0.3, (0, 0, 8, 8), b"\0", unfamiliar=True)
        store.record_frame(FrameRecord(specimen, "replay:x", 2, "used", (cell,), 0, None, colour=(70.0,) * 6,
                                       um_per_pixel=0.1))
    with Store(path) as store:
        specimen = store.open_specimen()
        assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5
        assert specimen.bundle is None  # counted before specimens named their bundle
        assert [c.cut for _, c in store.cells(specimen)] == ["", "", "", ""]  # and before cells were cut out
        assert store.label_counts(specimen) == {"neutrophil": 2, "lymphocyte": 1, "unidentified": 1}
        assert store.unfamiliar_count(specimen) == 1
        assert (specimen.fields, specimen.colour_frames, specimen.colour_sums, specimen.um_per_pixel) == \
            (8, 1, (70.0,) * 6, 0.1)


def test_a_state_database_of_a_newer_version_is_refused_untouched(tmp_path):
    path = tmp_path / STATE_FILE
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(StateError, match="newer Hematovision .*install that version again or move the file aside"):
        Store(path)
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 99
    db.close()


def test_each_cell_in_json_says_how_unfamiliar_it_is(repo_root, samples_bccd, samples_pbc, capsys):
    model = str(repo_root / "models" / "reference")
    fields = sorted((samples_bccd / "BCCD" / "JPEGImages").glob("*.jpg"))
    assert edge_main(["count", "--model", model, "--json", "--all", *map(str, fields)]) == 0
    lines = _json_lines(capsys)
    cells = [c for line in lines if "cells" in line for c in line["cells"]]
    assert cells and all(isinstance(c["novelty"], float) and isinstance(c["unfamiliar"], bool) for c in cells)
    assert sum(c["unfamiliar"] for c in cells) == lines[-1]["summary"]["unfamiliar"]
    assert all(c["label"] == "unidentified" for c in cells if c["unfamiliar"])
    image = sorted((samples_pbc / "neutrophil").iterdir())[0]
    assert edge_main(["classify", "--model", model, "--json", str(image)]) == 0
    one = _json_lines(capsys)[0]
    assert one["unfamiliar"] is False and one["novelty"] < load_bundle(model, 1).novelty.threshold
