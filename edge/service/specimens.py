"""The daemon's specimens for the web page: status, reports, review and sign-off, commands, over the state."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from hematovision.classes import REJECT, ROLES, UNIDENTIFIED, differential_classes

from ..counting.tally import NRBC_CLASS
from ..reports import review
from ..reports.report import CellChange, Report
from ..web.backend import (COUNTING, PRELIMINARY, PRUNED, VERIFIED, CommandResult, Conflict, NotFound,
                           SpecimenEntry, StartRequest)
from .state import Specimen, StateError, Store

logger = logging.getLogger(__name__)

COMMAND_WAIT_S = 5.0  # a start or finish is answered once the frame loop took it, or as queued after this
_POLL_S = 0.05


class StateSpecimens:
    """The web page's view of the state database, through one connection of its own used by one request at a
    time. Reads never block the frame loop (WAL); a change is one short transaction, like the outbox's. Starts
    and finishes go through the command queue the frame loop takes at its next frame: the page waits for the
    loop, never the other way round.
    """

    device = True

    def __init__(self, state_path: Path, classes: tuple[str, ...], build: Callable[[Store, Specimen], dict],
                 wake_outbox: Callable[[], None] = lambda: None, command_wait_s: float = COMMAND_WAIT_S):
        self.store = Store(state_path, shared=True)
        self.classes, self.build, self.wake_outbox = classes, build, wake_outbox
        self.wbc_classes = differential_classes(classes)
        self.command_wait_s = command_wait_s
        self._lock = threading.Lock()

    def close(self) -> None:
        self.store.close()

    def use_classes(self, classes: tuple[str, ...]) -> None:
        """The class list of the bundle the daemon counts with now (another was installed between specimens)."""
        with self._lock:
            self.classes, self.wbc_classes = classes, differential_classes(classes)

    # --- status and list ---------------------------------------------------------------

    def status(self) -> dict:
        with self._lock:
            specimen = self.store.open_specimen()
            counts = self.store.label_counts(specimen) if specimen else {}
            last = self._last_finished()
            pending = len(self.store.pending_commands())
        out = {"state": COUNTING if specimen else "target reached" if last and last["reason"] == "target reached"
               else "idle", "specimen_id": specimen.specimen_id if specimen else None,
               "counted": sum(counts.get(c, 0) for c in self.wbc_classes),
               "target": specimen.target if specimen else None, "device": True,
               "counts": {c: counts.get(c, 0) for c in self.wbc_classes}, "unidentified": counts.get(UNIDENTIFIED, 0),
               "frames": _frames(specimen), "last_finished": last, "pending_commands": pending}
        if NRBC_CLASS in self.classes:
            out["nrbc"] = counts.get(NRBC_CLASS, 0)
        if any(ROLES.get(c) == REJECT for c in self.classes):
            out["rejected"] = sum(n for c, n in counts.items() if ROLES.get(c) == REJECT)
        if specimen:
            out.update(accession=specimen.accession, operator=specimen.operator)
        return out

    def _last_finished(self) -> dict | None:
        row = self.store.db.execute(
            "SELECT s.specimen_id, s.finish_reason, s.finished_at, s.target, (SELECT COUNT(*) FROM cells c WHERE "
            f"c.specimen = s.id AND c.label IN ({','.join('?' * len(self.wbc_classes))})) FROM specimens s "
            "WHERE s.status = 'finished' ORDER BY s.id DESC LIMIT 1", self.wbc_classes).fetchone()
        if row is None:
            return None
        return {"specimen_id": row[0], "reason": row[1], "finished_at": row[2], "target": row[3], "counted": row[4]}

    def entries(self) -> list[SpecimenEntry]:
        with self._lock:
            counted = self._identified_by_specimen()
            rows = self.store.specimens()
            signed = dict(self.store.db.execute(
                "SELECT specimen, json_extract(report, '$.verification.operator') FROM outbox WHERE kind = 'verified'"
            ).fetchall())
        return [SpecimenEntry(s.specimen_id, _state(s, prelim, verified), counted.get(s.row) if prelim or
                              s.status == "open" else None, s.target, s.started_at, s.finished_at, signed.get(s.row))
                for s, prelim, verified in rows]

    def _identified_by_specimen(self) -> dict[int, int]:
        marks = ",".join("?" * len(self.wbc_classes))
        return dict(self.store.db.execute(f"SELECT specimen, COUNT(*) FROM cells WHERE label IN ({marks}) "
                                          "GROUP BY specimen", self.wbc_classes).fetchall())

    # --- reports, review and sign-off -------------------------------------------------------

    def report(self, specimen_id: str, kind: str = "current") -> Report:
        with self._lock:
            stored = self._stored(specimen_id)
            if kind == "current" and stored.specimen.status == "open":
                return Report.from_dict(self.build(self.store, stored.specimen))
        if kind == "current":
            if stored.verified is not None:
                return Report.from_dict(stored.verified)
            return review.apply_changes(self._preliminary(stored), _changes(stored))
        data = stored.verified if kind == VERIFIED else stored.preliminary
        if data is None:
            raise NotFound(f"specimen {specimen_id} has no {kind} report")
        return Report.from_dict(data)

    def changes(self, specimen_id: str) -> tuple[CellChange, ...]:
        with self._lock:
            return _changes(self._stored(specimen_id))

    def change_cell(self, specimen_id: str, cell: int, label: object, operator: str | None) -> Report:
        with self._lock:
            stored = self._reviewable(specimen_id)
            preliminary, changes = self._preliminary(stored), _changes(stored)
            change = review.change_cell(review.apply_changes(preliminary, changes), cell, label, operator,
                                        datetime.now())
            self._write(lambda: self.store.add_change(stored.specimen, change.to_dict()))
        logger.info("specimen %s: cell %d changed from %s to %s by %s", specimen_id, cell, change.from_label,
                    change.to_label, change.operator or "(the signer)")
        return review.apply_changes(preliminary, changes + (change,))

    def sign(self, specimen_id: str, operator: object) -> Report:
        with self._lock:
            stored = self._reviewable(specimen_id)
            verified = review.sign(self._preliminary(stored), _changes(stored), operator, datetime.now())
            self._write(lambda: self.store.add_verified_report(stored.specimen, verified.to_dict()))
        self.wake_outbox()
        return verified

    def _stored(self, specimen_id: str):
        stored = self.store.specimen_reports(specimen_id)
        if stored is None:
            raise NotFound(f"no specimen {specimen_id!r} on this device")
        return stored

    def _reviewable(self, specimen_id: str):
        stored = self._stored(specimen_id)
        if stored.verified is not None:
            raise review.AlreadyVerified(f"specimen {specimen_id} is verified already; a verified report is not "
                                         "changed")
        return stored

    @staticmethod
    def _preliminary(stored) -> Report:
        if stored.preliminary is None:
            state = "is still counting" if stored.specimen.status == "open" else "has no report kept (pruned)"
            raise Conflict(f"specimen {stored.specimen.specimen_id} {state}: there is no report to review yet")
        return Report.from_dict(stored.preliminary)

    @staticmethod
    def _write(step: Callable[[], None]) -> None:
        try:
            step()
        except StateError as err:
            raise Conflict(str(err)) from err

    # --- commands ---------------------------------------------------------------------------

    def command(self, action: str, start: StartRequest | None = None) -> CommandResult:
        """Queue a start or finish for the frame loop and wait (at most command_wait_s) for what it made of it."""
        start = start or StartRequest()
        with self._lock:
            row = self.store.add_command(action, start.specimen_id, start.target, start.wbc_10e9_per_l,
                                         start.accession, start.operator)
        deadline = time.monotonic() + self.command_wait_s
        while time.monotonic() < deadline:
            with self._lock:
                result = self.store.command_result(row)
            if result is not None:
                return CommandResult(row, result)
            time.sleep(_POLL_S)
        return CommandResult(row, None)


def _changes(stored) -> tuple[CellChange, ...]:
    return tuple(CellChange(c["cell"], c["from"], c["to"], c["operator"], c["at"]) for c in stored.changes)


def _state(specimen: Specimen, preliminary: bool, verified: bool) -> str:
    if specimen.status == "open":
        return COUNTING
    return VERIFIED if verified else PRELIMINARY if preliminary else PRUNED


def _frames(specimen: Specimen | None) -> dict | None:
    if specimen is None:
        return None
    return {"used": specimen.fields, "skipped_blur": specimen.skipped_blur,
            "skipped_motion": specimen.skipped_motion, "unusable": specimen.unusable}
