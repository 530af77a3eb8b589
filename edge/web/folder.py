"""The specimens of a folder of reports (a desktop's copy, or `count --report`): reviewed and signed there."""

from __future__ import annotations

import json
import logging
import os
import threading
from datetime import datetime
from pathlib import Path

from hematovision.errors import HematovisionError

from ..reports import review
from ..reports.files import VERIFIED_SUFFIX, open_folder_nofollow, safe_file_stem, write_atomic, write_report_files
from ..reports.report import PRELIMINARY as PRELIMINARY_TEXT
from ..reports.report import CellChange, Report
from ..reports.schema import SCHEMA_ID
from ..reports.verified_cells import PENDING, keep_folder_cells
from .backend import PRELIMINARY, VERIFIED, CommandResult, Conflict, NotFound, SpecimenEntry, StartRequest

logger = logging.getLogger(__name__)

REVIEW_SUFFIX = ".review.json"  # the changes made to a preliminary report's cells, until it is signed
MAX_REPORT_BYTES = 64 * 2**20
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC


class FolderSpecimens:
    """Every report of one folder, by specimen id. A URL names a specimen id, never a file: the files are the
    folder's own, found by listing it (symlinks and other folders are passed over)."""

    device = False

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[tuple[int, int], dict | None]] = {}

    def status(self) -> dict:
        return {"state": "reports folder", "specimen_id": None, "counted": 0, "target": None, "device": False,
                "folder": self.folder.name}

    def entries(self) -> list[SpecimenEntry]:
        out = []
        for specimen_id, files in sorted(self._reports().items(), key=lambda kv: kv[1].get("started_at", ""),
                                         reverse=True):
            data = files.get(VERIFIED) or files[PRELIMINARY]
            identified = sum(c["count"] for c in data["classes"])
            signed = files.get(VERIFIED, {}).get("verification")
            out.append(SpecimenEntry(specimen_id, VERIFIED if VERIFIED in files else PRELIMINARY, identified,
                                     data["target"], data["started_at"], data["finished_at"],
                                     signed.get("operator") if isinstance(signed, dict) else None))
        return out

    def report(self, specimen_id: str, kind: str = "current") -> Report:
        files = self._files(specimen_id)
        if kind == "current":
            if VERIFIED in files:
                return Report.from_dict(files[VERIFIED])
            return review.apply_changes(self._preliminary(specimen_id, files), self.changes(specimen_id))
        if kind not in files:
            raise NotFound(f"specimen {specimen_id} has no {kind} report")
        return Report.from_dict(files[kind])

    def changes(self, specimen_id: str) -> tuple[CellChange, ...]:
        data = self._read(safe_file_stem(specimen_id) + REVIEW_SUFFIX)
        if data is None:
            return ()
        try:
            return tuple(CellChange(c["cell"], c["from"], c["to"], c["operator"], c["at"]) for c in data["changes"])
        except (KeyError, TypeError) as err:
            raise Conflict(f"{self.folder / (safe_file_stem(specimen_id) + REVIEW_SUFFIX)} is damaged ({err!r}); "
                           "move it aside to start the review again") from err

    def change_cell(self, specimen_id: str, cell: int, label: object, operator: str | None) -> Report:
        with self._lock:
            files = self._files(specimen_id)
            if VERIFIED in files:
                raise review.AlreadyVerified(f"specimen {specimen_id} is verified; a verified report is not changed")
            preliminary, changes = self._preliminary(specimen_id, files), self.changes(specimen_id)
            change = review.change_cell(review.apply_changes(preliminary, changes), cell, label, operator,
                                        datetime.now())
            changes += (change,)
            body = {"specimen_id": specimen_id, "changes": [c.to_dict() for c in changes]}
            self._write(safe_file_stem(specimen_id) + REVIEW_SUFFIX, json.dumps(body, indent=1).encode())
            return review.apply_changes(preliminary, changes)

    def sign(self, specimen_id: str, operator: object) -> Report:
        with self._lock:
            files = self._files(specimen_id)
            if VERIFIED in files:
                raise review.AlreadyVerified(f"specimen {specimen_id} is verified already")
            verified = review.sign(self._preliminary(specimen_id, files), self.changes(specimen_id), operator,
                                   datetime.now())
            write_report_files(verified, self.folder)
            self._keep_cells(verified)
            return verified

    def keep_waiting_cells(self) -> None:
        """Keep the cells of every signed report whose cuts still wait (its sign-off was cut short before)."""
        for specimen_id, files in self._reports().items():
            if VERIFIED in files and (self.folder / PENDING / safe_file_stem(specimen_id)).is_dir():
                self._keep_cells(Report.from_dict(files[VERIFIED]))

    def _keep_cells(self, verified: Report) -> None:
        """The signed cells kept for adapting the model, where the count left their images; the sign-off stands
        whatever becomes of them (a failure is logged)."""
        try:
            keep_folder_cells(self.folder, verified)
        except (HematovisionError, OSError) as err:
            logger.error("specimen %s is signed, but its cells were not kept for adapting the model: %s",
                         verified.specimen_id, err)

    def command(self, action: str, start: StartRequest | None = None) -> CommandResult:
        raise Conflict("this page shows a folder of reports: specimens are started and finished on the device")

    # --- the folder ---------------------------------------------------------------------

    def _files(self, specimen_id: str) -> dict[str, dict]:
        files = self._reports().get(specimen_id)
        if files is None:
            raise NotFound(f"no report of specimen {specimen_id!r} in {self.folder}")
        return files

    @staticmethod
    def _preliminary(specimen_id: str, files: dict[str, dict]) -> Report:
        if PRELIMINARY not in files:
            raise Conflict(f"specimen {specimen_id}: only its verified report is in the folder")
        return Report.from_dict(files[PRELIMINARY])

    def _reports(self) -> dict[str, dict[str, dict]]:
        """specimen id -> {"preliminary": report dict, "verified": report dict} of the folder's report files."""
        found: dict[str, dict[str, dict]] = {}
        try:
            names = sorted(e.name for e in os.scandir(self.folder) if e.is_file(follow_symlinks=False))
        except OSError as err:
            raise NotFound(f"cannot read the reports folder {self.folder}: {err.strerror}") from err
        for name in names:
            if name.startswith(".") or not name.endswith(".json") or name.endswith(REVIEW_SUFFIX):
                continue
            data = self._read(name)
            if isinstance(data, dict) and data.get("schema") == SCHEMA_ID and isinstance(data.get("specimen_id"), str):
                kind = PRELIMINARY if data.get("verification") == PRELIMINARY_TEXT else VERIFIED
                if kind == PRELIMINARY and name.endswith(VERIFIED_SUFFIX + ".json"):
                    continue
                found.setdefault(data["specimen_id"], {}).setdefault(kind, data)
        return found

    def _read(self, name: str) -> dict | None:
        """A JSON file of the folder (no symlink, at most MAX_REPORT_BYTES), cached while unchanged; None when
        absent or not JSON."""
        try:
            with open_folder_nofollow(self.folder) as dir_fd:
                fd = os.open(name, _READ_FLAGS, dir_fd=dir_fd)
                with os.fdopen(fd, "rb") as handle:
                    stat = os.fstat(handle.fileno())
                    key = (stat.st_mtime_ns, stat.st_size)
                    cached = self._cache.get(name)
                    if cached and cached[0] == key:
                        return cached[1]
                    data = _parse(handle.read(MAX_REPORT_BYTES + 1), name)
        except OSError:
            return None
        self._cache[name] = (key, data)
        return data

    def _write(self, name: str, data: bytes) -> None:
        with open_folder_nofollow(self.folder) as dir_fd:
            write_atomic(dir_fd, name, data)
            os.fsync(dir_fd)


def _parse(data: bytes, name: str) -> dict | None:
    if len(data) > MAX_REPORT_BYTES:
        logger.warning("%s is larger than %d MB: not read as a report", name, MAX_REPORT_BYTES // 2**20)
        return None
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
