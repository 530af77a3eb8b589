"""What the web page needs of the specimens it shows: the daemon's state, or a folder of reports."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Protocol

from hematovision.errors import HematovisionError

from ..reports.report import CellChange, Report

COUNTING, PRELIMINARY, VERIFIED, PRUNED = "counting", "preliminary", "verified", "pruned"
REPORT_KINDS = ("current", PRELIMINARY, VERIFIED)


class NotFound(HematovisionError):
    """No specimen, cell or report of that name."""


class Conflict(HematovisionError):
    """The request cannot be done in the specimen's state (still counting, verified, a specimen open)."""


@dataclass(frozen=True)
class SpecimenEntry:
    """One line of the reports list."""

    specimen_id: str
    state: str  # COUNTING, PRELIMINARY, VERIFIED or PRUNED
    counted: int | None  # identified white cells
    target: int | None
    started_at: str | None
    finished_at: str | None
    verified_by: str | None = None

    def to_dict(self) -> dict:
        return dict(vars(self))


@dataclass(frozen=True)
class CommandResult:
    """What became of a start or finish: done ("started S-1"), refused (with why), or still queued."""

    command: int | None
    result: str | None  # None: queued, the daemon takes it at its next frame

    @property
    def refused(self) -> bool:
        return bool(self.result) and self.result.startswith("refused")

    def to_dict(self) -> dict:
        return {"command": self.command, "result": self.result,
                "state": "queued" if self.result is None else "refused" if self.refused else "done"}


@dataclass(frozen=True)
class StartRequest:
    """A specimen to start, as entered at the microscope; None: the configuration's default."""

    specimen_id: str | None = None
    accession: str | None = None
    operator: str | None = None
    target: int | None = None
    wbc_10e9_per_l: float | None = None


class Specimens(Protocol):
    """The specimens a page shows and changes. Raises NotFound, Conflict, ReviewRefused (edge/reports/review.py)."""

    device: bool  # True: a counting device (live view, specimen entry); False: a folder of reports

    def status(self) -> dict: ...

    def entries(self) -> list[SpecimenEntry]: ...

    def report(self, specimen_id: str, kind: str = "current") -> Report:
        """The current report (counting: as counted so far; preliminary: with the changes made since;
        verified: the signed one), or the stored preliminary or verified one."""
        ...

    def change_cell(self, specimen_id: str, cell: int, label: object, operator: str | None) -> Report: ...

    def changes(self, specimen_id: str) -> tuple[CellChange, ...]: ...

    def sign(self, specimen_id: str, operator: object) -> Report: ...

    def command(self, action: str, start: StartRequest | None = None) -> CommandResult: ...


def cell_jpeg(report: Report, cell_id: int) -> bytes:
    """The JPEG thumbnail of one cell of a report. Raises NotFound."""
    cell = next((c for c in report.cells if c.id == cell_id), None)
    if cell is None or not cell.thumbnail:
        raise NotFound(f"specimen {report.specimen_id} has no image of cell {cell_id}")
    return base64.b64decode(cell.thumbnail.split(",", 1)[1])


def without_thumbnails(data: dict) -> dict:
    """A report dict with its cells' thumbnails left out (null), for a page that fetches them one by one."""
    return {**data, "cells": [{**c, "thumbnail": None} for c in data["cells"]]}
