"""A finished count as a report: frozen values, exact binomial intervals, dict round trip."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime

from ..counting.checks import FULL_REVIEW, Flag
from ..counting.tally import (NRBC_CLASS, ClassCount, NrbcCount, RejectedCount, absolute_count, clopper_pearson,
                              per_100_wbc)
from .schema import SCHEMA_ID, ReportInvalid, validate_report_dict

PRELIMINARY = "preliminary: not verified"
# How far a stored percent may sit from count / identified (the values are rounded to 0.01).
PERCENT_TOLERANCE = 0.011

__all__ = [
    "PRELIMINARY", "SCHEMA_ID", "ReportInvalid", "ModelInfo", "ClassCount", "NrbcCount",
    "RejectedCount", "FrameStats", "CellRecord", "CellChange", "Verification", "Flag", "Report", "clopper_pearson",
    "build_classes", "build_nrbc", "verification_text", "commissioning_report",
]


@dataclass(frozen=True)
class ModelInfo:
    """The bundle that made the count: its name, the project version that exported it, its model's sha256 and,
    in reports made since bundles are installed on the device, its stamp and export time (None in older ones)."""

    name: str
    version: str
    sha256: str
    meta_sha256: str | None = None  # bundle.json's stamp: the whole bundle, not only its model
    created_at: str | None = None

    @property
    def text(self) -> str:
        """One line naming the bundle, e.g. "hematovision-efficientnet_lite0 0.1.0 (bundle ace36410560d, exported
        2026-11-29T04:20:44+00:00)"."""
        details = [f"bundle {self.meta_sha256[:12]}"] if self.meta_sha256 else []
        details += [f"exported {self.created_at}"] if self.created_at else []
        return f"{self.name} {self.version}" + (f" ({', '.join(details)})" if details else "")

    def to_dict(self) -> dict:
        return {k: v for k, v in vars(self).items() if v is not None}


@dataclass(frozen=True)
class FrameStats:
    """How many camera frames were used and why the others were skipped."""

    used: int
    skipped_blur: int
    skipped_motion: int


@dataclass(frozen=True)
class CellRecord:
    """One counted cell as shown in the gallery, with the name of the field it was found in."""

    id: int
    label: str
    confidence: float
    thumbnail: str | None
    slide_xy_um: tuple[float, float]
    field: str | None = None


@dataclass(frozen=True)
class CellChange:
    """One line of the audit trail: who changed which cell from what to what, and when (ISO 8601)."""

    cell: int
    from_label: str
    to_label: str
    operator: str
    at: str

    def to_dict(self) -> dict:
        return {"cell": self.cell, "from": self.from_label, "to": self.to_label, "operator": self.operator,
                "at": self.at}


@dataclass(frozen=True)
class Verification:
    """A person's sign-off: who, when (ISO 8601), and every cell they changed before signing."""

    operator: str
    signed_at: str
    changes: tuple[CellChange, ...] = ()

    @property
    def text(self) -> str:
        return f"verified by {self.operator} at {self.signed_at}"

    def to_dict(self) -> dict:
        return {"operator": self.operator, "signed_at": self.signed_at,
                "changes": [c.to_dict() for c in self.changes]}


@dataclass(frozen=True)
class Report:
    """A differential count report (schema hematovision.report/1).

    `classes` is the differential (the 100%). Nucleated red cells (`nrbc`, None when the model
    has no such class) and rejected detections (`rejected`, empty when the model has no reject
    class) are counted beside it; `total` is every counted cell, each one in `cells`. `flags` say what is
    wrong with the specimen, worst first (edge/counting/checks.py); their codes are `quality_flags`.
    """

    specimen_id: str
    device_id: str
    started_at: str
    finished_at: str | None
    model: ModelInfo
    calibration_profile_id: str | None
    classes: tuple[ClassCount, ...]
    unidentified: int
    total: int
    target: int
    target_reached: bool
    frames: FrameStats
    flags: tuple[Flag, ...]
    verification: str | Verification  # PRELIMINARY, a person's sign-off (or an older "verified by" text)
    cells: tuple[CellRecord, ...]
    nrbc: NrbcCount | None = None
    rejected: tuple[RejectedCount, ...] = ()
    wbc_10e9_per_l: float | None = None  # the white count the operator entered; None: not entered
    accession: str | None = None  # the laboratory's accession number, entered at the specimen's start
    operator: str | None = None  # who started the count at the microscope (not who verified it)

    @property
    def identified(self) -> int:
        """Cells given a differential class (the denominator of every percent and of NRBC)."""
        return sum(c.count for c in self.classes)

    @property
    def rejected_total(self) -> int:
        return sum(r.count for r in self.rejected)

    @property
    def white_cells(self) -> int:
        """Cells counted for the differential: identified plus unidentified."""
        return self.identified + self.unidentified

    def absolute(self, c: ClassCount) -> float | None:
        """A class's absolute count in 10^9/L, or None without the white count."""
        return None if self.wbc_10e9_per_l is None else absolute_count(c.percent, self.wbc_10e9_per_l)

    @property
    def quality_flags(self) -> tuple[str, ...]:
        """The flags' codes (the JSON's "quality_flags", as older reports had them)."""
        return tuple(f.code for f in self.flags)

    @property
    def needs_full_review(self) -> bool:
        """A flag (outside_training) says every cell must be verified."""
        return any(f.severity == FULL_REVIEW for f in self.flags)

    @property
    def verified(self) -> bool:
        return self.verification != PRELIMINARY

    @property
    def verification_text(self) -> str:
        """"preliminary: not verified" or "verified by NAME at TIME"."""
        return self.verification.text if isinstance(self.verification, Verification) else self.verification

    @property
    def verified_by(self) -> str:
        """The name of the person who signed the report; empty while it is preliminary."""
        if isinstance(self.verification, Verification):
            return self.verification.operator
        return self.verification.rsplit(" at ", 1)[0].removeprefix("verified by ") if self.verified else ""

    @property
    def changes(self) -> tuple[CellChange, ...]:
        """The cells a person changed before signing (the audit trail); none while preliminary."""
        return self.verification.changes if isinstance(self.verification, Verification) else ()

    def with_verification(self, name: str, at: datetime, changes: tuple[CellChange, ...] = ()) -> Report:
        """The same report signed by `name` at `at` (a time without a zone is local time), with the audit
        trail of the cells changed before (the report's cells already carry the changed labels).

        Raises ReportInvalid when the name is empty or holds control characters.
        """
        at = at if at.tzinfo is not None else at.astimezone()
        signed = Verification(name.strip(), at.isoformat(timespec="seconds"), tuple(changes))
        return Report.from_dict(replace(self, verification=signed).to_dict())

    def to_dict(self) -> dict:
        """The plain JSON-ready dict of the schema."""
        return {
            "schema": SCHEMA_ID, "specimen_id": self.specimen_id, "device_id": self.device_id,
            "started_at": self.started_at, "finished_at": self.finished_at,
            "model": self.model.to_dict(),
            "calibration_profile_id": self.calibration_profile_id,
            **({} if self.wbc_10e9_per_l is None else {"wbc_10e9_per_l": self.wbc_10e9_per_l}),
            **{k: v for k, v in (("accession", self.accession), ("operator", self.operator)) if v is not None},
            "classes": [_class_dict(c) for c in self.classes],
            **self._beside_dict(),
            "unidentified": self.unidentified, "total": self.total, "target": self.target,
            "target_reached": self.target_reached, "frames": vars(self.frames).copy(),
            "quality_flags": list(self.quality_flags), "flags": [f.to_dict() for f in self.flags],
            "needs_full_review": self.needs_full_review,
            "verification": self.verification.to_dict() if isinstance(self.verification, Verification)
            else self.verification,
            "cells": [_cell_dict(c) for c in self.cells],
        }

    def _beside_dict(self) -> dict:
        """The keys nrbc and rejected, only where the model has those classes (so a report of a
        four-class model is as before)."""
        out = {}
        if self.nrbc is not None:
            out["nrbc"] = self.nrbc.to_dict()
        if self.rejected:
            out["rejected"] = [r.to_dict() for r in self.rejected]
        return out

    @classmethod
    def from_dict(cls, data: object) -> Report:
        """Build a report from its dict after checking schema and internal consistency.

        Raises ReportInvalid naming the offending field.
        """
        validate_report_dict(data)
        report = cls(
            specimen_id=data["specimen_id"], device_id=data["device_id"],
            started_at=data["started_at"], finished_at=data["finished_at"],
            model=ModelInfo(**data["model"]),
            calibration_profile_id=data["calibration_profile_id"],
            classes=tuple(_class_from(c) for c in data["classes"]),
            unidentified=data["unidentified"], total=data["total"], target=data["target"],
            target_reached=data["target_reached"], frames=FrameStats(**data["frames"]),
            flags=_flags_from(data), verification=_verification_from(data["verification"]),
            cells=tuple(_cell_from(c) for c in data["cells"]),
            nrbc=_nrbc_from(data.get("nrbc")),
            rejected=tuple(RejectedCount(r["name"], r["count"]) for r in data.get("rejected", ())),
            wbc_10e9_per_l=data.get("wbc_10e9_per_l"),
            accession=data.get("accession"), operator=data.get("operator"),
        )
        check_consistency(report)
        return report


def _flags_from(data: dict) -> tuple[Flag, ...]:
    """The flags with their messages; a report written before flags had messages gets each code's plain one.

    Raises ReportInvalid when "flags", "quality_flags" and "needs_full_review" disagree.
    """
    codes = list(data["quality_flags"])
    if "flags" not in data:
        flags = tuple(Flag.of(code) for code in codes)
    elif [f["code"] for f in data["flags"]] != codes:
        raise ReportInvalid(f"report flags {[f['code'] for f in data['flags']]} are not its quality_flags {codes}")
    else:
        flags = tuple(Flag.of(f["code"], f["message"]) for f in data["flags"])
    full = any(f.severity == FULL_REVIEW for f in flags)
    if data.get("needs_full_review", full) != full:
        raise ReportInvalid(f"report needs_full_review is {data['needs_full_review']} but its flags "
                            f"{codes} say {full}")
    return flags


def _class_dict(c: ClassCount) -> dict:
    return {"name": c.name, "count": c.count, "percent": c.percent, "ci95": list(c.ci95)}


def _cell_dict(c: CellRecord) -> dict:
    out = {"id": c.id, "label": c.label, "confidence": c.confidence,
           "thumbnail": c.thumbnail, "slide_xy_um": list(c.slide_xy_um)}
    return out if c.field is None else {**out, "field": c.field}


def _class_from(d: dict) -> ClassCount:
    return ClassCount(d["name"], d["count"], float(d["percent"]),
                      (float(d["ci95"][0]), float(d["ci95"][1])))


def _nrbc_from(d: dict | None) -> NrbcCount | None:
    if d is None:
        return None
    per = d["per_100_wbc"]
    return NrbcCount(d["count"], None if per is None else float(per))


def _verification_from(d: str | dict) -> str | Verification:
    if isinstance(d, str):
        return d
    changes = tuple(CellChange(c["cell"], c["from"], c["to"], c["operator"], c["at"]) for c in d["changes"])
    return Verification(d["operator"], d["signed_at"], changes)


def _cell_from(d: dict) -> CellRecord:
    x, y = d["slide_xy_um"]
    return CellRecord(d["id"], d["label"], float(d["confidence"]), d["thumbnail"],
                      (float(x), float(y)), d.get("field"))


def check_consistency(report: Report) -> None:
    """Check what the schema cannot: sums, percents, intervals, times, unique names.

    Raises ReportInvalid naming the field.
    """
    names = [c.name for c in report.classes] + [NRBC_CLASS] * (report.nrbc is not None) + \
        [r.name for r in report.rejected]
    if len(set(names)) != len(names):
        raise ReportInvalid(f"report classes, nrbc and rejected repeat a name: {names}")
    _check_total(report)
    for c in report.classes:
        _check_class(c, report.identified)
    if report.nrbc is not None:
        _check_nrbc(report.nrbc, report.identified)
    _check_times(report)
    _check_cells(report, set(names))
    _check_changes(report)


def _check_total(report: Report) -> None:
    nrbc = report.nrbc.count if report.nrbc else 0
    expected = report.identified + report.unidentified + nrbc + report.rejected_total
    if report.total != expected:
        raise ReportInvalid(
            f"report total {report.total} is not the class counts ({report.identified}) plus "
            f"unidentified ({report.unidentified}), nrbc ({nrbc}) and rejected ({report.rejected_total})")


def _check_nrbc(nrbc: NrbcCount, identified: int) -> None:
    expected = per_100_wbc(nrbc.count, identified)
    if (expected is None) != (nrbc.per_100_wbc is None):
        raise ReportInvalid(f"nrbc per_100_wbc {nrbc.per_100_wbc} must be null exactly when no "
                            f"white cell is identified ({identified} identified)")
    if expected is not None and abs(nrbc.per_100_wbc - expected) > PERCENT_TOLERANCE:
        raise ReportInvalid(f"nrbc per_100_wbc {nrbc.per_100_wbc} is not {nrbc.count} per 100 of "
                            f"{identified} identified cells ({expected:.2f})")


def _check_class(c: ClassCount, identified: int) -> None:
    expected = 100.0 * c.count / identified if identified else 0.0
    if abs(c.percent - expected) > PERCENT_TOLERANCE:
        raise ReportInvalid(f"class {c.name}: percent {c.percent} is not {c.count} of "
                            f"{identified} identified cells ({expected:.2f})")
    lo, hi = c.ci95
    if not lo <= c.percent <= hi:
        raise ReportInvalid(f"class {c.name}: ci95 {list(c.ci95)} does not contain {c.percent}")


def _check_times(report: Report) -> None:
    started = _parse_time(report.started_at, "started_at")
    if report.finished_at is not None:
        finished = _parse_time(report.finished_at, "finished_at")
        if finished < started:
            raise ReportInvalid("report finished_at is before started_at")


def _parse_time(text: str, field: str) -> datetime:
    try:
        return datetime.fromisoformat(text)
    except ValueError as err:
        raise ReportInvalid(f"report {field} {text!r} is not an ISO 8601 time") from err


def _check_cells(report: Report, names: set[str]) -> None:
    ids = [c.id for c in report.cells]
    if len(set(ids)) != len(ids):
        raise ReportInvalid("report cells repeat an id")
    unknown = {c.label for c in report.cells} - names - {"unidentified"}
    if unknown:
        raise ReportInvalid(f"report cells have labels that are not report classes, nrbc or rejected: "
                            f"{sorted(unknown)}")


def _check_changes(report: Report) -> None:
    """Each change names a cell of the report, and a cell's last change is the label it has."""
    labels = {c.id: c.label for c in report.cells}
    last = {}
    for change in report.changes:
        if change.cell not in labels:
            raise ReportInvalid(f"verification change names cell {change.cell}, which the report does not have")
        _parse_time(change.at, "verification change time")
        last[change.cell] = change.to_label
    wrong = sorted(cell for cell, label in last.items() if labels[cell] != label)
    if wrong:
        raise ReportInvalid(f"verification: cell {wrong[0]} was last changed to {last[wrong[0]]!r} but is "
                            f"labelled {labels[wrong[0]]!r}")
    if isinstance(report.verification, Verification):
        _parse_time(report.verification.signed_at, "verification signed_at")


def verification_text(name: str, at: datetime) -> str:
    """The verification field for a person who checked the report at time `at` (a time
    without a zone is taken as local time).
    """
    at = at if at.tzinfo is not None else at.astimezone()
    return f"verified by {name.strip()} at {at.isoformat(timespec='seconds')}"


def build_classes(counts: Mapping[str, int], level: float = 0.95) -> tuple[ClassCount, ...]:
    """Per-class percent of identified cells with Clopper-Pearson intervals, in percent.

    Percents are rounded to 0.01; interval ends are rounded outwards to 0.01.
    """
    identified = sum(counts.values())
    out = []
    for name, count in counts.items():
        lo, hi = clopper_pearson(count, identified, level)
        percent = round(100.0 * count / identified, 2) if identified else 0.0
        ci = (math.floor(lo * 10000) / 100, math.ceil(hi * 10000) / 100)
        out.append(ClassCount(name, count, percent, (min(ci[0], percent), max(ci[1], percent))))
    return tuple(out)


def build_nrbc(count: int, identified: int) -> NrbcCount:
    """Nucleated red cells per 100 identified white cells, rounded to 0.01 (None with none)."""
    per = per_100_wbc(count, identified)
    return NrbcCount(count, None if per is None else round(per, 2))


def commissioning_report(specimen_id: str = "TEST-LINK-0001", device_id: str = "hv-test",
                         at: datetime | None = None) -> Report:
    """A small report marked 'commissioning_test_not_a_patient', to try a link end to end."""
    at = (at or datetime.now().astimezone()).replace(microsecond=0)
    counts = {"neutrophil": 58, "lymphocyte": 30, "monocyte": 7, "eosinophil": 4, "basophil": 1}
    classes = build_classes(counts)
    return Report(
        specimen_id=specimen_id, device_id=device_id, started_at=at.isoformat(),
        finished_at=at.isoformat(), model=ModelInfo("commissioning", "0", "0" * 64),
        calibration_profile_id=None, classes=classes, unidentified=2, total=102, target=100,
        target_reached=True, frames=FrameStats(40, 3, 1),
        flags=(Flag.of("commissioning_test_not_a_patient"),), verification=PRELIMINARY,
        cells=())
