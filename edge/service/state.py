"""The daemon's state in SQLite (WAL, synchronous FULL): specimens, counted cells, report outbox."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from hematovision.errors import HematovisionError

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 5  # 2: specimens.wbc, commands.wbc, cells.field; 3: the evidence of the specimen checks;
# 4: outbox.kind (a specimen's preliminary and verified reports), review_changes, the accession and operator;
# 5: specimens.bundle (the bundle that counts it), each cell's place in its field and its cut (verified cells)
OPEN, FINISHED = "open", "finished"
FRAME_KINDS = ("used", "blur", "motion", "unusable")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS specimens (
    id INTEGER PRIMARY KEY,
    specimen_id TEXT NOT NULL UNIQUE,
    target INTEGER NOT NULL CHECK (target > 0),
    status TEXT NOT NULL CHECK (status IN ('open', 'finished')),
    started_at TEXT NOT NULL,
    finished_at TEXT,
    finish_reason TEXT,
    fields INTEGER NOT NULL DEFAULT 0,
    skipped_blur INTEGER NOT NULL DEFAULT 0,
    skipped_motion INTEGER NOT NULL DEFAULT 0,
    unusable INTEGER NOT NULL DEFAULT 0,
    edge_cells INTEGER NOT NULL DEFAULT 0,
    tracker_state TEXT,
    wbc REAL,
    colour_frames INTEGER NOT NULL DEFAULT 0,
    colour_sums TEXT,
    um_per_pixel REAL,
    accession TEXT,
    operator TEXT,
    bundle TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS one_open_specimen ON specimens (status) WHERE status = 'open';
CREATE TABLE IF NOT EXISTS cells (
    id INTEGER PRIMARY KEY,
    specimen INTEGER NOT NULL REFERENCES specimens (id),
    frame INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    x_um REAL NOT NULL,
    y_um REAL NOT NULL,
    label TEXT NOT NULL,
    confidence REAL NOT NULL,
    bbox TEXT NOT NULL,
    thumbnail BLOB NOT NULL,
    field TEXT,
    unfamiliar INTEGER NOT NULL DEFAULT 0,
    x_px REAL,
    y_px REAL,
    um_per_pixel REAL,
    cut TEXT,
    UNIQUE (specimen, frame, seq)
);
CREATE TABLE IF NOT EXISTS settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS source_positions (
    source TEXT PRIMARY KEY,
    position INTEGER NOT NULL CHECK (position >= 0)
);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY,
    specimen INTEGER NOT NULL REFERENCES specimens (id),
    report TEXT NOT NULL,
    created_at TEXT NOT NULL,
    files_written INTEGER NOT NULL DEFAULT 0,
    link_sent INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    kind TEXT NOT NULL DEFAULT 'preliminary' CHECK (kind IN ('preliminary', 'verified')),
    UNIQUE (specimen, kind)
);
CREATE TABLE IF NOT EXISTS review_changes (
    id INTEGER PRIMARY KEY,
    specimen INTEGER NOT NULL REFERENCES specimens (id),
    cell INTEGER NOT NULL,
    from_label TEXT NOT NULL,
    to_label TEXT NOT NULL,
    operator TEXT NOT NULL,
    at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS keyframes (
    specimen INTEGER NOT NULL REFERENCES specimens (id),
    seq INTEGER NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (specimen, seq)
);
CREATE TABLE IF NOT EXISTS commands (
    id INTEGER PRIMARY KEY,
    action TEXT NOT NULL CHECK (action IN ('start', 'finish')),
    specimen_id TEXT,
    target INTEGER,
    created_at TEXT NOT NULL,
    done_at TEXT,
    result TEXT,
    wbc REAL,
    accession TEXT,
    operator TEXT
);
"""
# Columns added since version 1, in the order of _SCHEMA, with their declarations: a database of an earlier
# version gains them in place at its first opening (version 3's evidence: cells counted before are familiar,
# with no colour or pixel size; version 4: no accession number or operator; version 5: no bundle recorded, no cell's
# place in its field nor cut).
_ADDED_COLUMNS = (("specimens", "wbc", "REAL"), ("cells", "field", "TEXT"), ("commands", "wbc", "REAL"),
                  ("specimens", "colour_frames", "INTEGER NOT NULL DEFAULT 0"), ("specimens", "colour_sums", "TEXT"),
                  ("specimens", "um_per_pixel", "REAL"), ("cells", "unfamiliar", "INTEGER NOT NULL DEFAULT 0"),
                  ("specimens", "accession", "TEXT"), ("specimens", "operator", "TEXT"),
                  ("commands", "accession", "TEXT"), ("commands", "operator", "TEXT"),
                  ("specimens", "bundle", "TEXT"), ("cells", "x_px", "REAL"), ("cells", "y_px", "REAL"),
                  ("cells", "um_per_pixel", "REAL"), ("cells", "cut", "TEXT"))
PRELIMINARY_REPORT, VERIFIED_REPORT = "preliminary", "verified"  # outbox.kind
_OUTBOX_COLUMNS = "id, specimen, report, created_at, files_written, link_sent, attempts, last_error"
_SPECIMEN_COLUMNS = ("id, specimen_id, target, status, started_at, finished_at, finish_reason, fields, skipped_blur, "
                     "skipped_motion, unusable, edge_cells, tracker_state, wbc, colour_frames, colour_sums, "
                     "um_per_pixel, accession, operator, bundle")


class StateError(HematovisionError):
    """The state database cannot be opened or is damaged."""


class StorageFull(StateError):
    """Too little disk space to record counting safely; nothing was half-written."""


def now_iso() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


@dataclass(frozen=True)
class BundleRef:
    """The bundle a specimen is counted with, as stored with it: what its report names, and the folder it was
    loaded from (a versioned folder of the installed models, so that a restart finds it again)."""

    name: str
    meta_sha256: str
    created_at: str | None
    path: str

    @classmethod
    def of(cls, bundle) -> BundleRef:
        """The reference of a loaded Bundle (edge/vision/model_bundle.py), by its real folder."""
        created = bundle.meta.get("created_at")
        return cls(str(bundle.meta.get("name", "model")), str(bundle.meta.get("meta_sha256", "")),
                   created if isinstance(created, str) else None, str(Path(bundle.path).resolve()))

    def to_json(self) -> str:
        return json.dumps(vars(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | None) -> BundleRef | None:
        return cls(**json.loads(text)) if text else None


@dataclass(frozen=True)
class Specimen:
    """One specimen row: its target, frame statistics and the tracker state after its last frame."""

    row: int
    specimen_id: str
    target: int
    status: str
    started_at: str
    finished_at: str | None
    finish_reason: str | None
    fields: int
    skipped_blur: int
    skipped_motion: int
    unusable: int
    edge_cells: int
    tracker_state: dict | None
    wbc_10e9_per_l: float | None = None  # the white count entered at its start; None: not entered
    colour_frames: int = 0  # used frames whose colour summaries are summed in colour_sums
    colour_sums: tuple[float, ...] | None = None
    um_per_pixel: float | None = None  # of the latest used frame
    accession: str | None = None  # the laboratory's accession number, entered at its start
    operator: str | None = None  # who started it at the microscope
    bundle: BundleRef | None = None  # the bundle it is counted with; None: counted before specimens recorded it


@dataclass(frozen=True)
class NewCell:
    """A counted cell as stored: slide position in micrometres, class, thumbnail, the field it was found in,
    whether it is unlike the training cells, its centre in the field (pixels) at the field's pixel size, and its
    cut's file (edge/reports/verified_cells.py; empty: none kept) with the cut's top-left corner in the field."""

    x_um: float
    y_um: float
    label: str
    confidence: float
    bbox: tuple[int, int, int, int]
    thumbnail: bytes
    field: str = ""
    unfamiliar: bool = False
    x_px: float | None = None
    y_px: float | None = None
    um_per_pixel: float | None = None
    cut: str = ""
    cut_origin: tuple[int, int] | None = None


@dataclass(frozen=True)
class FrameRecord:
    """What one frame changed: committed together, or not at all."""

    specimen: Specimen
    source: str
    index: int  # the frame's position in the source; the source resumes at index + 1
    kind: str  # one of FRAME_KINDS
    cells: tuple[NewCell, ...]
    edge_cells: int
    tracker_state: dict | None
    pipeline_state: dict | None = None  # what the pipeline carries from field to field
    keyframes: tuple[tuple[int, dict], ...] = ()  # (number, keyframe) the scan tracker added in this frame
    colour: tuple[float, ...] | None = None  # a used frame's colour summary, added to the specimen's sums
    um_per_pixel: float | None = None  # a used frame's pixel size


@dataclass(frozen=True)
class PruneSettings:
    """What is kept of delivered specimens: their cells, thumbnails, keyframes and report are
    deleted once older than `keep_days`, and oldest first while the database holds more than
    `max_mb`. The specimen's row stays, so its id is never used twice."""

    keep_days: float = 90.0
    max_mb: float = 1024.0


@dataclass(frozen=True)
class OutboxEntry:
    row: int
    specimen_id: str
    report: dict
    files_written: bool
    link_sent: bool
    attempts: int
    kind: str = PRELIMINARY_REPORT  # or VERIFIED_REPORT: the report a person signed, sent after the preliminary


@dataclass(frozen=True)
class SpecimenReports:
    """A finished specimen's reports as stored: the preliminary one, the verified one once signed, and the
    changes made to its cells since the preliminary report (not yet signed, or signed into the verified one)."""

    specimen: Specimen
    preliminary: dict | None  # None once pruned
    verified: dict | None
    changes: tuple[dict, ...]  # {cell, from, to, operator, at} in order


@dataclass(frozen=True)
class Command:
    row: int
    action: str
    specimen_id: str | None
    target: int | None
    wbc_10e9_per_l: float | None = None
    accession: str | None = None
    operator: str | None = None


class Store:
    """The state database; one connection, used from one thread."""

    def __init__(self, path: str | Path, min_free_bytes: int = 0, max_page_count: int | None = None,
                 shared: bool = False):
        """`shared`: the connection may be used from several threads, one at a time (the caller's lock)."""
        self.path, self.min_free_bytes = Path(path), min_free_bytes
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, isolation_level=None, timeout=10.0, check_same_thread=not shared)
        except (OSError, sqlite3.Error) as err:
            raise StateError(f"cannot open the state database {self.path} ({err}); check that the state "
                             "folder exists and belongs to the service user") from err
        self._setup(max_page_count)

    def _setup(self, max_page_count: int | None) -> None:
        try:
            self.db.execute("PRAGMA journal_mode = WAL").fetchone()
            self.db.execute("PRAGMA synchronous = FULL")
            self.db.execute("PRAGMA foreign_keys = ON")
            if max_page_count:
                self.db.execute(f"PRAGMA max_page_count = {int(max_page_count)}").fetchone()
            if self.db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise StateError(f"{self.path} is damaged (quick_check failed); move it aside to start afresh")
            self._create_or_upgrade()
        except sqlite3.DatabaseError as err:
            self.close()
            raise _state_error(err, self.path) from err
        except StateError:
            self.close()
            raise

    def _create_or_upgrade(self) -> None:
        """The tables of this version, in one transaction: created, or an earlier version's upgraded in place.

        Raises StateError for a database of a later version (its columns would be lost on the way back).
        """
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StateError(f"{self.path} was written by a newer Hematovision (state version {version}, this one "
                             f"reads up to {SCHEMA_VERSION}); install that version again or move the file aside")
        with self.transaction() as db:
            self._rebuild_outbox(db)
            for statement in filter(str.strip, _SCHEMA.split(";")):
                db.execute(statement)
            for table, column, declaration in _ADDED_COLUMNS:
                if column not in {row[1] for row in db.execute(f"PRAGMA table_info({table})")}:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        if 0 < version < SCHEMA_VERSION:
            logger.info("state database %s upgraded from version %d to %d", self.path, version, SCHEMA_VERSION)

    def _rebuild_outbox(self, db: sqlite3.Connection) -> None:
        """An outbox of version 3 or earlier held one report per specimen: rebuilt, rows kept, to hold the verified
        one too (inside the upgrade's transaction)."""
        columns = {row[1] for row in db.execute("PRAGMA table_info(outbox)")}
        if columns and "kind" not in columns:
            db.execute("ALTER TABLE outbox RENAME TO outbox_v3")
            db.execute(_SCHEMA[_SCHEMA.index("CREATE TABLE IF NOT EXISTS outbox"):
                               _SCHEMA.index("CREATE TABLE IF NOT EXISTS review_changes")].rstrip().rstrip(";"))
            db.execute(f"INSERT INTO outbox ({_OUTBOX_COLUMNS}) SELECT {_OUTBOX_COLUMNS} FROM outbox_v3")
            db.execute("DROP TABLE outbox_v3")
            logger.info("state database %s: outbox made ready for verified reports", self.path)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE .. COMMIT; any error rolls back. Raises StorageFull, StateError."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as err:
            raise _state_error(err, self.path) from err
        try:
            yield self.db
            self.db.execute("COMMIT")
        except BaseException as err:
            with contextlib.suppress(sqlite3.Error):
                self.db.execute("ROLLBACK")
            if isinstance(err, sqlite3.Error):
                raise _state_error(err, self.path) from err
            raise

    def check_space(self) -> None:
        """Raises StorageFull when the state folder's disk has less free space than configured."""
        stats = os.statvfs(self.path.parent)
        free = stats.f_bavail * stats.f_frsize
        if free < self.min_free_bytes:
            raise StorageFull(f"only {free // 2**20} MB free on the disk of {self.path.parent} "
                              f"(at least {self.min_free_bytes // 2**20} MB needed): counting stopped; "
                              "free space (old reports, logs) and counting resumes")

    # --- specimens --------------------------------------------------------------

    def open_specimen(self) -> Specimen | None:
        row = self.db.execute(f"SELECT {_SPECIMEN_COLUMNS} FROM specimens WHERE status = 'open'").fetchone()
        return _specimen(row) if row else None

    def specimen(self, specimen_id: str) -> Specimen | None:
        row = self.db.execute(f"SELECT {_SPECIMEN_COLUMNS} FROM specimens WHERE specimen_id = ?",
                              (specimen_id,)).fetchone()
        return _specimen(row) if row else None

    def last_finished(self) -> tuple[Specimen, dict | None] | None:
        """The specimen finished last and its report (None once pruned), or None before the first."""
        row = self.db.execute(f"SELECT {_SPECIMEN_COLUMNS} FROM specimens WHERE status = 'finished' "
                              "ORDER BY finished_at DESC, id DESC LIMIT 1").fetchone()
        return (_specimen(row), self.report(row[1])) if row else None

    def specimen_ids(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT specimen_id FROM specimens ORDER BY id")]

    def start_specimen(self, specimen_id: str, target: int, wbc_10e9_per_l: float | None = None,
                       accession: str | None = None, operator: str | None = None,
                       bundle: BundleRef | None = None) -> Specimen:
        """A new open specimen (with the white count in 10^9/L, accession number and operator when entered, and
        the bundle that counts it). Raises StateError when one is open or the id was used."""
        self.check_space()
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM specimens WHERE status = 'open'").fetchone():
                raise StateError(f"cannot start {specimen_id!r}: a specimen is still open; finish it first")
            if db.execute("SELECT 1 FROM specimens WHERE specimen_id = ?", (specimen_id,)).fetchone():
                raise StateError(f"specimen id {specimen_id!r} was counted before; give a new id")
            db.execute("INSERT INTO specimens (specimen_id, target, status, started_at, wbc, accession, operator, "
                       "bundle) VALUES (?, ?, 'open', ?, ?, ?, ?, ?)",
                       (specimen_id, target, now_iso(), wbc_10e9_per_l, accession, operator,
                        bundle.to_json() if bundle else None))
        logger.info("started specimen %s (target %d cells)", specimen_id, target)
        return self.specimen(specimen_id)

    # --- frames and cells ---------------------------------------------------------

    def position(self, source: str) -> int:
        row = self.db.execute("SELECT position FROM source_positions WHERE source = ?", (source,)).fetchone()
        return row[0] if row else 0

    def record_frame(self, frame: FrameRecord) -> None:
        """The frame's new cells, the specimen's statistics, evidence and tracker state, and the source
        position, in one transaction. Raises StorageFull (nothing written), StateError.
        """
        self.check_space()
        column = {"used": "fields", "blur": "skipped_blur", "motion": "skipped_motion",
                  "unusable": "unusable"}[frame.kind]
        with self.transaction() as db:
            db.executemany(
                "INSERT INTO cells (specimen, frame, seq, x_um, y_um, label, confidence, bbox, thumbnail, field, "
                "unfamiliar, x_px, y_px, um_per_pixel, cut) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(frame.specimen.row, frame.index, i, c.x_um, c.y_um, c.label, c.confidence,
                  json.dumps(list(c.bbox)), c.thumbnail, c.field, int(c.unfamiliar), c.x_px, c.y_px,
                  c.um_per_pixel, json.dumps({"file": c.cut, "origin": list(c.cut_origin)}) if c.cut else None)
                 for i, c in enumerate(frame.cells)])
            db.execute(f"UPDATE specimens SET {column} = {column} + 1, edge_cells = edge_cells + ?, "
                       "tracker_state = ? WHERE id = ? AND status = 'open'",
                       (frame.edge_cells, _json_or_none(frame.tracker_state), frame.specimen.row))
            self._add_evidence(db, frame)
            self._set_position(db, frame.source, frame.index + 1)
            db.executemany("INSERT OR REPLACE INTO keyframes (specimen, seq, data) VALUES (?, ?, ?)",
                           [(frame.specimen.row, n, _json_or_none(k)) for n, k in frame.keyframes])
            if frame.pipeline_state is not None:
                db.execute("INSERT OR REPLACE INTO settings (key, value) VALUES ('pipeline_state', ?)",
                           (_json_or_none(frame.pipeline_state),))

    @staticmethod
    def _add_evidence(db: sqlite3.Connection, frame: FrameRecord) -> None:
        """A used frame's colour summary added to the specimen's sums, and its pixel size (same transaction)."""
        if frame.colour is not None:
            frames, sums = db.execute("SELECT colour_frames, colour_sums FROM specimens WHERE id = ?",
                                      (frame.specimen.row,)).fetchone()
            total = [a + b for a, b in zip(json.loads(sums), frame.colour)] if sums else list(frame.colour)
            db.execute("UPDATE specimens SET colour_frames = ?, colour_sums = ? WHERE id = ? AND status = 'open'",
                       (frames + 1, json.dumps(total, allow_nan=False), frame.specimen.row))
        if frame.um_per_pixel is not None:
            db.execute("UPDATE specimens SET um_per_pixel = ? WHERE id = ? AND status = 'open'",
                       (frame.um_per_pixel, frame.specimen.row))

    def pipeline_state(self) -> dict | None:
        row = self.db.execute("SELECT value FROM settings WHERE key = 'pipeline_state'").fetchone()
        return json.loads(row[0]) if row else None

    def skip_frame(self, source: str, index: int) -> None:
        """Move past a frame while no specimen is open."""
        self.check_space()
        with self.transaction() as db:
            self._set_position(db, source, index + 1)

    @staticmethod
    def _set_position(db: sqlite3.Connection, source: str, position: int) -> None:
        db.execute("INSERT INTO source_positions (source, position) VALUES (?, ?) "
                   "ON CONFLICT (source) DO UPDATE SET position = excluded.position", (source, position))

    def keyframes(self, specimen: Specimen, limit: int) -> list[dict]:
        """The latest `limit` keyframes of a scan, oldest first, each with its number as "seq"."""
        rows = self.db.execute("SELECT seq, data FROM keyframes WHERE specimen = ? ORDER BY seq DESC LIMIT ?",
                               (specimen.row, limit)).fetchall()
        return [{**json.loads(data), "seq": seq} for seq, data in reversed(rows)]

    def label_counts(self, specimen: Specimen) -> dict[str, int]:
        rows = self.db.execute("SELECT label, COUNT(*) FROM cells WHERE specimen = ? GROUP BY label",
                               (specimen.row,))
        return dict(rows.fetchall())

    def unfamiliar_count(self, specimen: Specimen) -> int:
        """Cells of the specimen unlike the training cells."""
        row = self.db.execute("SELECT COUNT(*) FROM cells WHERE specimen = ? AND unfamiliar", (specimen.row,))
        return row.fetchone()[0]

    def cells(self, specimen: Specimen) -> list[tuple[int, NewCell]]:
        """(frame, cell) in counting order (the order of the report's cell numbers)."""
        rows = self.db.execute("SELECT frame, x_um, y_um, label, confidence, bbox, thumbnail, field, unfamiliar, "
                               "x_px, y_px, um_per_pixel, cut FROM cells WHERE specimen = ? ORDER BY frame, seq",
                               (specimen.row,))
        return [(r[0], NewCell(r[1], r[2], r[3], r[4], tuple(json.loads(r[5])), bytes(r[6]), r[7] or "",
                               bool(r[8]), r[9], r[10], r[11], *_cut(r[12]))) for r in rows]

    def verified_specimens(self) -> list[Specimen]:
        """The specimens whose report a person signed, in the order they were counted."""
        rows = self.db.execute(f"SELECT {', '.join('s.' + c.strip() for c in _SPECIMEN_COLUMNS.split(','))} "
                               "FROM specimens s WHERE EXISTS (SELECT 1 FROM outbox o WHERE o.specimen = s.id AND "
                               "o.kind = 'verified') ORDER BY s.id").fetchall()
        return [_specimen(r) for r in rows]

    def rows_with_cells(self) -> set[int]:
        """The specimen rows that have counted cells kept (not pruned)."""
        return {r[0] for r in self.db.execute("SELECT DISTINCT specimen FROM cells")}

    # --- finishing and the outbox -------------------------------------------------

    def finish_specimen(self, specimen: Specimen, reason: str, report: dict) -> None:
        """Close the specimen and put its report in the outbox, together. Raises StorageFull."""
        self.check_space()
        with self.transaction() as db:
            db.execute("UPDATE specimens SET status = 'finished', finished_at = ?, finish_reason = ? "
                       "WHERE id = ? AND status = 'open'", (report.get("finished_at") or now_iso(), reason,
                                                             specimen.row))
            db.execute("INSERT INTO outbox (specimen, report, created_at) VALUES (?, ?, ?)",
                       (specimen.row, json.dumps(report, allow_nan=False), now_iso()))
            db.execute("DELETE FROM keyframes WHERE specimen = ?", (specimen.row,))  # only a scan in progress needs them
        logger.info("finished specimen %s (%s)", specimen.specimen_id, reason)

    def pending_reports(self, files: bool, link: bool) -> list[OutboxEntry]:
        """Reports still to write (files) or send (link), in the order they were made."""
        rows = self.db.execute(
            "SELECT o.id, s.specimen_id, o.report, o.files_written, o.link_sent, o.attempts, o.kind FROM outbox o "
            "JOIN specimens s ON s.id = o.specimen WHERE (? AND NOT o.files_written) OR (? AND NOT o.link_sent) "
            "ORDER BY o.id", (files, link))
        return [OutboxEntry(r[0], r[1], json.loads(r[2]), bool(r[3]), bool(r[4]), r[5], r[6]) for r in rows]

    def report(self, specimen_id: str, kind: str = PRELIMINARY_REPORT) -> dict | None:
        row = self.db.execute("SELECT o.report FROM outbox o JOIN specimens s ON s.id = o.specimen "
                              "WHERE s.specimen_id = ? AND o.kind = ?", (specimen_id, kind)).fetchone()
        return json.loads(row[0]) if row else None

    # --- review and sign-off --------------------------------------------------------

    def specimens(self) -> list[tuple[Specimen, bool, bool]]:
        """Every specimen, newest first, with whether it has a preliminary and a verified report kept."""
        rows = self.db.execute(
            f"SELECT {', '.join('s.' + c.strip() for c in _SPECIMEN_COLUMNS.split(','))}, "
            "EXISTS (SELECT 1 FROM outbox o WHERE o.specimen = s.id AND o.kind = 'preliminary'), "
            "EXISTS (SELECT 1 FROM outbox o WHERE o.specimen = s.id AND o.kind = 'verified') "
            "FROM specimens s ORDER BY s.id DESC").fetchall()
        return [(_specimen(r[:-2]), bool(r[-2]), bool(r[-1])) for r in rows]

    def specimen_reports(self, specimen_id: str) -> SpecimenReports | None:
        """A specimen's stored reports and review changes; None for an unknown id."""
        specimen = self.specimen(specimen_id)
        if specimen is None:
            return None
        changes = tuple({"cell": r[0], "from": r[1], "to": r[2], "operator": r[3], "at": r[4]} for r in self.db.execute(
            "SELECT cell, from_label, to_label, operator, at FROM review_changes WHERE specimen = ? ORDER BY id",
            (specimen.row,)))
        return SpecimenReports(specimen, self.report(specimen_id), self.report(specimen_id, VERIFIED_REPORT), changes)

    def add_change(self, specimen: Specimen, change: dict) -> None:
        """Record one cell's change ({cell, from, to, operator, at}) of a finished specimen not yet verified.
        Raises StateError when the specimen is verified or not finished."""
        with self.transaction() as db:
            self._check_reviewable(db, specimen)
            db.execute("INSERT INTO review_changes (specimen, cell, from_label, to_label, operator, at) "
                       "VALUES (?, ?, ?, ?, ?, ?)", (specimen.row, change["cell"], change["from"], change["to"],
                                                     change["operator"], change["at"]))

    def add_verified_report(self, specimen: Specimen, report: dict) -> None:
        """Put the signed report in the outbox, after the preliminary one (which stays). Raises StateError when
        the specimen is verified already or not finished, StorageFull."""
        self.check_space()
        with self.transaction() as db:
            self._check_reviewable(db, specimen)
            db.execute("INSERT INTO outbox (specimen, report, created_at, kind) VALUES (?, ?, ?, 'verified')",
                       (specimen.row, json.dumps(report, allow_nan=False), now_iso()))
        logger.info("specimen %s verified by %s", specimen.specimen_id, report["verification"]["operator"])

    @staticmethod
    def _check_reviewable(db: sqlite3.Connection, specimen: Specimen) -> None:
        kinds = {r[0] for r in db.execute("SELECT kind FROM outbox WHERE specimen = ?", (specimen.row,))}
        if VERIFIED_REPORT in kinds:
            raise StateError(f"specimen {specimen.specimen_id} is verified already; a verified report is not changed")
        if PRELIMINARY_REPORT not in kinds:
            raise StateError(f"specimen {specimen.specimen_id} has no report to review (still counting, or pruned)")

    def mark_report(self, entry: OutboxEntry, *, files: bool = False, link: bool = False,
                    error: str | None = None) -> None:
        with self.transaction() as db:
            db.execute("UPDATE outbox SET files_written = files_written OR ?, link_sent = link_sent OR ?, "
                       "attempts = attempts + ?, last_error = ? WHERE id = ?",
                       (files, link, 1 if error else 0, error, entry.row))

    def prune(self, settings: PruneSettings, files: bool, link: bool) -> int:
        """Delete what is kept of delivered specimens past `settings`; returns how many were pruned."""
        rows = self.db.execute(
            "SELECT s.id, s.specimen_id, s.finished_at FROM specimens s WHERE s.status = 'finished' "
            "AND EXISTS (SELECT 1 FROM outbox o WHERE o.specimen = s.id) AND NOT EXISTS (SELECT 1 FROM outbox o "
            "WHERE o.specimen = s.id AND ((? AND NOT o.files_written) OR (? AND NOT o.link_sent))) ORDER BY s.id",
            (files, link)).fetchall()
        cutoff = datetime.now().astimezone().timestamp() - settings.keep_days * 86400
        pruned = 0
        for row, specimen_id, finished_at in rows:
            if _timestamp(finished_at) >= cutoff and self.used_bytes() <= settings.max_mb * 2**20:
                continue
            with self.transaction() as db:
                for table in ("cells", "keyframes", "outbox", "review_changes"):
                    db.execute(f"DELETE FROM {table} WHERE specimen = ?", (row,))
                db.execute("UPDATE specimens SET tracker_state = NULL WHERE id = ?", (row,))
            logger.info("pruned delivered specimen %s (finished %s)", specimen_id, finished_at)
            pruned += 1
        return pruned

    def used_bytes(self) -> int:
        """Bytes of the database's pages in use (free pages are reused, not counted)."""
        pages, free, size = (self.db.execute(f"PRAGMA {p}").fetchone()[0]
                             for p in ("page_count", "freelist_count", "page_size"))
        return (pages - free) * size

    # --- commands -----------------------------------------------------------------

    def add_command(self, action: str, specimen_id: str | None = None, target: int | None = None,
                    wbc_10e9_per_l: float | None = None, accession: str | None = None,
                    operator: str | None = None) -> int:
        with self.transaction() as db:
            cursor = db.execute("INSERT INTO commands (action, specimen_id, target, created_at, wbc, accession, "
                                "operator) VALUES (?, ?, ?, ?, ?, ?, ?)",
                                (action, specimen_id, target, now_iso(), wbc_10e9_per_l, accession, operator))
        return cursor.lastrowid

    def pending_commands(self) -> list[Command]:
        rows = self.db.execute("SELECT id, action, specimen_id, target, wbc, accession, operator FROM commands "
                               "WHERE done_at IS NULL ORDER BY id")
        return [Command(*r) for r in rows]

    def complete_command(self, command: Command, result: str) -> None:
        with self.transaction() as db:
            db.execute("UPDATE commands SET done_at = ?, result = ? WHERE id = ?", (now_iso(), result, command.row))

    def command_result(self, row: int) -> str | None:
        found = self.db.execute("SELECT result FROM commands WHERE id = ?", (row,)).fetchone()
        return found[0] if found else None


def _specimen(row) -> Specimen:
    """A Specimen from a row of _SPECIMEN_COLUMNS."""
    *values, tracker, wbc, colour_frames, colour_sums, um, accession, operator, bundle = row
    return Specimen(*values, json.loads(tracker) if tracker else None, wbc, colour_frames,
                    tuple(json.loads(colour_sums)) if colour_sums else None, um, accession, operator,
                    BundleRef.from_json(bundle))


def _cut(text: str | None) -> tuple[str, tuple[int, int] | None]:
    """A cell's stored cut: its file and its top-left corner in the field ("", None: none kept)."""
    if not text:
        return "", None
    cut = json.loads(text)
    return cut["file"], tuple(cut["origin"])


def _timestamp(iso: str | None) -> float:
    """Seconds since the epoch of a stored ISO time; an unreadable one counts as now (kept)."""
    try:
        when = datetime.fromisoformat(iso)
    except (TypeError, ValueError):
        return datetime.now().timestamp()
    return (when if when.tzinfo else when.astimezone()).timestamp()


def _json_or_none(value: dict | None) -> str | None:
    return None if value is None else json.dumps(value, allow_nan=False, separators=(",", ":"))


def _state_error(err: sqlite3.Error, path: Path) -> StateError:
    if getattr(err, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "full" in str(err).lower():
        return StorageFull(f"the state database {path} is full ({err}): counting stopped with nothing "
                           "half-written; free disk space and counting resumes")
    return StateError(f"state database {path}: {err}; check the disk, or move the file aside to start afresh")
