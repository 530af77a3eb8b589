"""Review and sign-off: cells relabelled, the differential recomputed, the audit trail, ASTM F and C, the outbox."""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime, timezone

import pytest

from hematovision.edge.links.astm import RecordSettings, parse_message, report_records
from hematovision.edge.reports import review
from hematovision.edge.reports.files import report_csv, write_report_files
from hematovision.edge.reports.html_page import render_html
from hematovision.edge.reports.report import Report
from hematovision.edge.service.state import Store
from test_report import eight_class_report

WHEN = datetime(2024, 5, 6, 12, 0, tzinfo=timezone.utc)


def neutrophil_ids(report: Report) -> list[int]:
    return [c.id for c in report.cells if c.label == "neutrophil"]


def test_relabelling_a_cell_recomputes_the_differential_nrbc_and_rejected():
    report = eight_class_report()  # 50 neutrophils, 50 lymphocytes, 7 NRBC, 3 platelets, 2 unidentified
    first = neutrophil_ids(report)[0]
    changed = review.relabel(report, {first: "lymphocyte", neutrophil_ids(report)[1]: review.NOT_WHITE_CELL})
    counts = {c.name: c.count for c in changed.classes}
    assert counts["neutrophil"] == 48 and counts["lymphocyte"] == 51
    assert {r.name: r.count for r in changed.rejected} == {"platelet": 3, review.NOT_WHITE_CELL: 1}
    assert changed.nrbc.per_100_wbc == round(7 * 100 / 99, 2) and changed.total == report.total
    Report.from_dict(changed.to_dict())  # sums, percents and intervals all consistent


def test_a_change_to_unidentified_can_raise_the_unidentified_flag_and_lose_the_target():
    report = eight_class_report()
    many = {i: "unidentified" for i in neutrophil_ids(report)[:20]}
    changed = review.relabel(report, many)
    assert changed.unidentified == 22 and not changed.target_reached
    assert "too_many_unidentified" in changed.quality_flags and "target_not_reached" in changed.quality_flags


def test_change_cell_refuses_an_unknown_cell_an_unknown_label_and_the_same_label():
    report = eight_class_report()
    with pytest.raises(review.UnknownCell):
        review.change_cell(report, 999, "lymphocyte", "Ada", WHEN)
    with pytest.raises(review.ReviewRefused, match="not a label"):
        review.change_cell(report, 1, "dragon", "Ada", WHEN)
    with pytest.raises(review.ReviewRefused, match="already"):
        review.change_cell(report, 1, report.cells[0].label, "Ada", WHEN)
    with pytest.raises(review.ReviewRefused, match="one line"):
        review.change_cell(report, 1, "lymphocyte", "Ada\nLovelace", WHEN)


def test_every_label_has_its_own_key_and_unidentified_and_not_a_white_cell_are_offered():
    labels = review.labels(eight_class_report())
    names, keys = [x.name for x in labels], [x.key for x in labels if x.key]
    assert {"unidentified", review.NOT_WHITE_CELL, "erythroblast", "platelet"} <= set(names)
    assert len(keys) == len(set(keys))


def test_sign_gives_a_verified_report_with_its_audit_trail_and_the_signer_for_unnamed_changes():
    report = eight_class_report()
    a, b = neutrophil_ids(report)[:2]
    changes = (review.change_cell(report, a, "monocyte", "Bob", WHEN),
               review.change_cell(report, b, "unidentified", None, WHEN))
    verified = review.sign(report, changes, "  Ada  ", WHEN)
    data = verified.to_dict()
    assert data["verification"]["operator"] == "Ada" and data["verification"]["signed_at"] == WHEN.isoformat()
    assert data["verification"]["changes"] == [
        {"cell": a, "from": "neutrophil", "to": "monocyte", "operator": "Bob", "at": WHEN.isoformat()},
        {"cell": b, "from": "neutrophil", "to": "unidentified", "operator": "Ada", "at": WHEN.isoformat()}]
    assert Report.from_dict(json.loads(json.dumps(data))) == verified
    with pytest.raises(review.AlreadyVerified):
        review.sign(verified, (), "Ada", WHEN)
    with pytest.raises(review.AlreadyVerified):
        review.change_cell(verified, a, "lymphocyte", "Ada", WHEN)


def test_the_verified_csv_and_html_carry_the_audit_trail():
    report = eight_class_report()
    cell = neutrophil_ids(report)[0]
    verified = review.sign(report, (review.change_cell(report, cell, "monocyte", "Bob", WHEN),), "Ada", WHEN)
    csv_text = report_csv(verified).decode("utf-8-sig")
    assert f"cell {cell}: neutrophil -> monocyte by Bob at {WHEN.isoformat()}" in csv_text
    assert "verified by Ada at" in csv_text
    page = render_html(verified)
    assert 'id="changes"' in page and f'href="#cell-{cell}"' in page and "Bob" in page


def test_a_changed_cells_label_that_disagrees_with_the_trail_is_refused():
    report = eight_class_report()
    verified = review.sign(report, (review.change_cell(report, 1, "monocyte", "Bob", WHEN),), "Ada", WHEN).to_dict()
    verified["verification"]["changes"][0]["to"] = "lymphocyte"
    with pytest.raises(review.ReportInvalid, match="last changed"):
        Report.from_dict(verified)


def test_astm_results_are_final_where_unchanged_and_corrected_where_the_review_changed_them():
    report = eight_class_report()
    preliminary = parse_message(report_records(report, RecordSettings(), WHEN))
    assert {r.status for r in preliminary.results.values()} == {"P"}
    cell = neutrophil_ids(report)[0]
    verified = review.sign(report, (review.change_cell(report, cell, "monocyte", "Bob", WHEN),), "Ada", WHEN)
    records = report_records(verified, RecordSettings(), WHEN)
    results = parse_message(records).results
    assert results["NEUT%"].status == results["MONO%"].status == "C"  # 49 and 1 of the same 100 identified
    assert results["LYMPH%"].status == results["UNIDCNT"].status == results["CELLCNT"].status == "F"
    assert records[2].split("|")[25] == "C"  # the order's report type: corrected
    unchanged = report_records(review.sign(report, (), "Ada", WHEN), RecordSettings(), WHEN)
    assert {r.status for r in parse_message(unchanged).results.values()} == {"F"}
    assert unchanged[2].split("|")[25] == "F"


def test_a_version_2_outbox_is_rebuilt_with_its_reports_and_takes_a_verified_one(tmp_path):
    path = tmp_path / "state.db"
    with Store(path) as store:
        specimen = store.start_specimen("S-1", 10)
        store.finish_specimen(specimen, "test", eight_class_report("S-1").to_dict())
    db = sqlite3.connect(path)  # make it the version 2 table: one report per specimen, no kind
    db.executescript("ALTER TABLE outbox RENAME TO o3; CREATE TABLE outbox (id INTEGER PRIMARY KEY, specimen INTEGER "
                     "NOT NULL UNIQUE REFERENCES specimens (id), report TEXT NOT NULL, created_at TEXT NOT NULL, "
                     "files_written INTEGER NOT NULL DEFAULT 0, link_sent INTEGER NOT NULL DEFAULT 0, attempts INTEGER "
                     "NOT NULL DEFAULT 0, last_error TEXT); INSERT INTO outbox SELECT id, specimen, report, created_at, "
                     "files_written, link_sent, attempts, last_error FROM o3; DROP TABLE o3;")
    db.close()
    with Store(path) as store:
        stored = store.specimen_reports("S-1")
        assert stored.preliminary["specimen_id"] == "S-1" and stored.verified is None
        verified = review.sign(Report.from_dict(stored.preliminary), (), "Ada", WHEN)
        store.add_verified_report(stored.specimen, verified.to_dict())
        kinds = [e.kind for e in store.pending_reports(files=True, link=True)]
        assert kinds == ["preliminary", "verified"]
        with pytest.raises(Exception, match="verified already"):
            store.add_verified_report(stored.specimen, verified.to_dict())


def test_the_verified_files_sit_beside_the_preliminary_ones(tmp_path):
    report = eight_class_report()
    write_report_files(report, tmp_path)
    write_report_files(review.sign(report, (), "Ada", WHEN), tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(f"S-2024-0002{kind}.{ext}" for kind in ("", ".verified") for ext in ("json", "csv", "html"))
