"""A person's review of a report: cells relabelled, the differential recomputed, the sign-off."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime

from hematovision.classes import UNIDENTIFIED

from ..config import ChecksConfig
from ..counting.checks import (DIFFERENTIAL_REVIEW, LOW_FOCUS, OUTSIDE_TRAINING, SEVERITIES, TARGET_NOT_REACHED,
                               TOO_MANY_UNIDENTIFIED, Flag, differential_review, target_not_reached,
                               too_many_unidentified)
from ..counting.tally import NRBC_CLASS, RejectedCount, make_tally
from .report import CellChange, Report, ReportInvalid, build_classes, build_nrbc

# What a person calls a detection that is no white cell and no class of the model (debris, a smudge, a red
# cell): counted with the rejected detections, in no result.
NOT_WHITE_CELL = "not_a_white_cell"
# One key per label for keyboard review (CellaVision-style); labels without a key are reached by click.
KEYS = {"neutrophil": "n", "lymphocyte": "l", "monocyte": "m", "eosinophil": "e", "basophil": "b", "ig": "i",
        "erythroblast": "r", "platelet": "p", UNIDENTIFIED: "u", NOT_WHITE_CELL: "x"}
MAX_OPERATOR = 128
# Flags that follow from the counts, so a review judges them again; every other flag stays as counted.
COUNT_FLAGS = (DIFFERENTIAL_REVIEW, TOO_MANY_UNIDENTIFIED, TARGET_NOT_REACHED)
# The order edge/counting/checks.py lists flags of one severity in.
FLAG_ORDER = (OUTSIDE_TRAINING, DIFFERENTIAL_REVIEW, TOO_MANY_UNIDENTIFIED, LOW_FOCUS, TARGET_NOT_REACHED)


class ReviewRefused(ReportInvalid):
    """A change or sign-off that cannot be made: a label the report has not, a missing operator's name."""


class UnknownCell(ReviewRefused):
    """The report has no cell of that number."""


class AlreadyVerified(ReviewRefused):
    """The report is verified: it is not changed, and not signed again."""


@dataclass(frozen=True)
class Label:
    """A label a cell can be given in review, its key and the group it is shown in."""

    name: str
    key: str
    group: str  # "differential", "nrbc", "rejected" or "unidentified"


def labels(report: Report) -> tuple[Label, ...]:
    """Every label a cell of `report` can take: its differential classes, NRBC and reject classes where the
    model has them, unidentified, and not a white cell."""
    out = [Label(c.name, KEYS.get(c.name, ""), "differential") for c in report.classes]
    if report.nrbc is not None:
        out.append(Label(NRBC_CLASS, KEYS[NRBC_CLASS], "nrbc"))
    out += [Label(r.name, KEYS.get(r.name, ""), "rejected") for r in report.rejected if r.name != NOT_WHITE_CELL]
    return tuple(out + [Label(UNIDENTIFIED, KEYS[UNIDENTIFIED], "unidentified"),
                        Label(NOT_WHITE_CELL, KEYS[NOT_WHITE_CELL], "rejected")])


def check_operator(name: object) -> str:
    """The operator's name, stripped. Raises ReviewRefused for a missing, long or control-character name."""
    if not isinstance(name, str) or not name.strip():
        raise ReviewRefused("the operator's name is missing; type your name")
    name = name.strip()
    if len(name) > MAX_OPERATOR or any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        raise ReviewRefused(f"the operator's name must be one line of at most {MAX_OPERATOR} characters")
    return name


def change_cell(report: Report, cell_id: int, label: object, operator: str | None, at: datetime) -> CellChange:
    """The change that gives cell `cell_id` of `report` the label `label`.

    Raises ReviewRefused for a verified report, an unknown cell or label, or the label the cell has already.
    """
    if report.verified:
        raise AlreadyVerified(f"specimen {report.specimen_id} is verified ({report.verification_text}); "
                              "a verified report is not changed")
    cell = next((c for c in report.cells if c.id == cell_id), None)
    if cell is None:
        raise UnknownCell(f"specimen {report.specimen_id} has no cell {cell_id}")
    names = [x.name for x in labels(report)]
    if label not in names:
        raise ReviewRefused(f"{label!r} is not a label of this report; use one of {', '.join(names)}")
    if label == cell.label:
        raise ReviewRefused(f"cell {cell_id} is {label} already")
    who = check_operator(operator) if operator is not None else ""
    return CellChange(cell_id, cell.label, label, who, at.astimezone().isoformat(timespec="seconds"))


def apply_changes(report: Report, changes: Iterable[CellChange]) -> Report:
    """`report` with each change applied in order (the last change of a cell wins), every count recomputed.

    Raises ReviewRefused when a change names a cell the report does not have.
    """
    wanted: dict[int, str] = {}
    for change in changes:
        wanted[change.cell] = change.to_label
    return relabel(report, wanted)


def relabel(report: Report, new_labels: Mapping[int, str]) -> Report:
    """`report` with cells relabelled (cell id -> label) and the differential, NRBC, rejected and unidentified
    counts, the target and the count flags recomputed from its cells. Raises ReviewRefused for an unknown cell."""
    unknown = set(new_labels) - {c.id for c in report.cells}
    if unknown:
        raise UnknownCell(f"specimen {report.specimen_id} has no cell {min(unknown)}")
    cells = tuple(replace(c, label=new_labels.get(c.id, c.label)) for c in report.cells)
    counts = _label_counts(cells)
    classes = build_classes({c.name: counts.get(c.name, 0) for c in report.classes})
    identified = sum(c.count for c in classes)
    rejected = _rejected(report, counts)
    recounted = replace(
        report, cells=cells, classes=classes, unidentified=counts.get(UNIDENTIFIED, 0),
        nrbc=None if report.nrbc is None else build_nrbc(counts.get(NRBC_CLASS, 0), identified),
        rejected=rejected, target_reached=identified >= report.target)
    return replace(recounted, flags=_flags(recounted, report.flags))


def _label_counts(cells) -> dict[str, int]:
    counts: dict[str, int] = {}
    for cell in cells:
        counts[cell.label] = counts.get(cell.label, 0) + 1
    return counts


def _rejected(report: Report, counts: Mapping[str, int]) -> tuple[RejectedCount, ...]:
    """The model's reject classes as before (a zero stays), then not-a-white-cell while any cell is one."""
    names = [r.name for r in report.rejected if r.name != NOT_WHITE_CELL]
    if counts.get(NOT_WHITE_CELL):
        names.append(NOT_WHITE_CELL)
    return tuple(RejectedCount(name, counts.get(name, 0)) for name in names)


def _flags(report: Report, before: tuple[Flag, ...], limits: ChecksConfig = ChecksConfig()) -> tuple[Flag, ...]:
    """The flags of `before` that do not follow from the counts, and the count flags judged again (with the
    default limits of [checks]), worst first."""
    names = [c.name for c in report.classes] + [NRBC_CLASS] * (report.nrbc is not None) + \
        [r.name for r in report.rejected if r.name != NOT_WHITE_CELL]
    tally = make_tally(_label_counts(report.cells), names, report.target)
    found = (differential_review(tally), too_many_unidentified(tally, limits), target_not_reached(tally))
    flags = [f for f in before if f.code not in COUNT_FLAGS] + [f for f in found if f is not None]
    return tuple(sorted(flags, key=lambda f: (-SEVERITIES.index(f.severity),
                                              FLAG_ORDER.index(f.code) if f.code in FLAG_ORDER else len(FLAG_ORDER))))


def sign(preliminary: Report, changes: tuple[CellChange, ...], operator: object, at: datetime) -> Report:
    """The verified report: the preliminary with the changes applied, signed by `operator` at `at`; changes
    made without a name are the signer's. Raises ReviewRefused for a verified report or a bad name."""
    if preliminary.verified:
        raise AlreadyVerified(f"specimen {preliminary.specimen_id} is verified already "
                              f"({preliminary.verification_text})")
    name = check_operator(operator)
    trail = tuple(c if c.operator else replace(c, operator=name) for c in changes)
    return apply_changes(preliminary, trail).with_verification(name, at, trail)


def preliminary_of(verified: Report) -> Report:
    """The report as it was before the person's changes (the labels each changed cell had first), for the
    results that were sent preliminary; a report without changes is returned as it is."""
    if not verified.changes:
        return verified
    first: dict[int, str] = {}
    for change in verified.changes:
        first.setdefault(change.cell, change.from_label)
    return relabel(verified, first)
