"""Verified cells kept to adapt the model: each cell of a signed report, its image in its field and its record.

A counted cell's cut (edge/vision/field_cut.py) waits in ROOT/cell_cuts/ until its report is signed; then every cell
with a cut is kept in ROOT/verified_cells/<specimen>/ (the images, and cells.json with the person's and the model's
labels, the signer, the bundle and where the cell lay), a folder that appears whole or not at all. ROOT is the
daemon's state folder, or a folder of reports on a desktop.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from hematovision.errors import DataError

from ..vision.field_cut import FieldCut, png_bytes
from .files import open_folder_nofollow, safe_file_stem, write_atomic
from .report import Report, Verification
from .review import preliminary_of

logger = logging.getLogger(__name__)

PENDING, VERIFIED = "cell_cuts", "verified_cells"
RECORDS = "cells.json"  # in a verified specimen's folder: its cells; in a desktop's pending folder: their cuts
RECORDS_FORMAT = "hematovision.verified_cells/1"


@dataclass(frozen=True)
class CellCut:
    """A counted cell's cut waiting for its report to be signed: the report's cell number, the PNG, and where the
    cell lay (field name, centre in the field, the cut's top-left corner in it, the field's pixel size)."""

    cell: int
    path: Path
    field: str
    x_px: float
    y_px: float
    origin: tuple[int, int]
    um_per_pixel: float


@dataclass(frozen=True)
class VerifiedCell:
    """One verified cell as kept: its image (a file name in its specimen's folder), the person's label and the
    model's, who signed and when, the bundle that counted it, and where it lay in its field."""

    specimen_id: str
    cell: int
    image: str
    label: str
    original_label: str
    operator: str
    signed_at: str
    bundle_name: str
    bundle_meta_sha256: str
    bundle_created_at: str | None
    source_field: str
    x_px: float  # the cell's centre in the field
    y_px: float
    origin_x_px: int  # the image's top-left corner in the field
    origin_y_px: int
    um_per_pixel: float

    @property
    def centre_in_image(self) -> tuple[float, float]:
        return self.x_px - self.origin_x_px, self.y_px - self.origin_y_px

    @classmethod
    def from_dict(cls, data: dict) -> VerifiedCell:
        return cls(**{k: data.get(k) for k in cls.__dataclass_fields__})


def pending_cut(cell: int, path: Path, field: str, cut: FieldCut) -> CellCut:
    """The record of a cut written as `path`."""
    return CellCut(cell, path, field, cut.centre[0], cut.centre[1], cut.origin, cut.um_per_pixel)


def verified_cells(report: Report, cuts: Mapping[int, CellCut]) -> list[VerifiedCell]:
    """The cells of a signed report that have a cut, with the person's label and the model's. Raises DataError for a
    report not signed, or cuts that are not of its cells (another count of the same specimen id)."""
    if not report.verified:
        raise DataError(f"specimen {report.specimen_id}: only the cells of a signed report are kept")
    original = {c.id: c.label for c in preliminary_of(report).cells}
    out = []
    for cell in report.cells:
        cut = cuts.get(cell.id)
        if cut is None:
            continue
        if cut.field != (cell.field or ""):
            raise DataError(f"specimen {report.specimen_id}: cell {cell.id} was found in {cell.field!r} but its cut "
                            f"in {cut.field!r}: the cuts are of another count of this specimen id")
        out.append(VerifiedCell(report.specimen_id, cell.id, f"{cell.id}.png", cell.label, original[cell.id],
                                report.verified_by, _signed_at(report), report.model.name,
                                report.model.meta_sha256 or "", report.model.created_at, cut.field, cut.x_px,
                                cut.y_px, cut.origin[0], cut.origin[1], cut.um_per_pixel))
    return out


def _signed_at(report: Report) -> str:
    """When a report was signed (an older report's "verified by NAME at TIME" text gives it too)."""
    if isinstance(report.verification, Verification):
        return report.verification.signed_at
    return report.verification.rsplit(" at ", 1)[-1]


# --- the cuts waiting for a signature ---------------------------------------------------------

def write_cut(folder: Path, name: str, cut: FieldCut) -> Path:
    """The cut as a PNG `name` in `folder` (created), atomically and fsynced. Raises LinkFailed (OSError inside)
    when it cannot be written."""
    with open_folder_nofollow(folder) as dir_fd:
        write_atomic(dir_fd, name, png_bytes(cut.image))
    return Path(folder) / name


def write_pending_records(folder: Path, cuts: Iterable[CellCut]) -> None:
    """A desktop's pending folder: the records of its cuts (cells.json beside the PNGs), written last."""
    body = {"format": RECORDS_FORMAT, "cuts": [{**asdict(c), "path": c.path.name} for c in cuts]}
    with open_folder_nofollow(folder) as dir_fd:
        write_atomic(dir_fd, RECORDS, json.dumps(body, indent=1).encode())
        os.fsync(dir_fd)


def read_pending_records(folder: Path) -> dict[int, CellCut]:
    """The cuts of a desktop's pending folder by cell number; empty when there is none. Raises DataError for a
    damaged records file."""
    try:
        body = json.loads((Path(folder) / RECORDS).read_text("utf-8"))
        return {c["cell"]: CellCut(c["cell"], Path(folder) / Path(c["path"]).name, c["field"], c["x_px"], c["y_px"],
                                   tuple(c["origin"]), c["um_per_pixel"]) for c in body["cuts"]}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{Path(folder) / RECORDS} is damaged ({err!r}); the cells of this specimen cannot be "
                        "kept") from err


# --- verified cells ---------------------------------------------------------------------------

def keep_verified(root: Path, report: Report, cuts: Mapping[int, CellCut]) -> Path | None:
    """Keep the cells of a signed report that have a cut in ROOT/verified_cells/<specimen>/ (images linked or copied,
    then cells.json, then the folder renamed into place whole). Returns the folder, None when no cell has a cut.
    Nothing is done for a specimen kept already. Raises DataError (verified_cells), OSError when the disk fails."""
    target = Path(root) / VERIFIED / safe_file_stem(report.specimen_id)
    if (target / RECORDS).is_file():
        return target
    cells = verified_cells(report, cuts)
    if not cells:
        return None
    temporary = target.parent / f".{target.name}.{secrets.token_hex(6)}"
    temporary.mkdir(parents=True)
    try:
        for cell in cells:
            _link_or_copy(cuts[cell.cell].path, temporary / cell.image)
        body = {"format": RECORDS_FORMAT, "specimen_id": report.specimen_id, "cells": [asdict(c) for c in cells]}
        with open_folder_nofollow(temporary) as dir_fd:
            write_atomic(dir_fd, RECORDS, json.dumps(body, indent=1, ensure_ascii=False).encode())
            os.fsync(dir_fd)
        _rename_whole(temporary, target)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    logger.info("kept %d verified cell(s) of specimen %s in %s", len(cells), report.specimen_id, target)
    return target


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link (the cut's file is never changed), or a copy fsynced where links are not possible."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
        with open(target, "rb") as handle:
            os.fsync(handle.fileno())


def _rename_whole(temporary: Path, target: Path) -> None:
    """Rename a finished folder into place; one kept meanwhile by another writer stays as it is."""
    try:
        os.rename(temporary, target)
    except OSError:
        if not (target / RECORDS).is_file():
            raise
    fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_verified(root: Path) -> list[tuple[Path, VerifiedCell]]:
    """Every verified cell kept under ROOT, with its image's path, by specimen folder then cell number. Raises
    DataError naming a damaged records file."""
    base = Path(root) / VERIFIED
    out = []
    folders = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")) if base.is_dir() else []
    for folder in folders:
        records = folder / RECORDS
        if not records.is_file():
            continue
        try:
            body = json.loads(records.read_text("utf-8"))
            cells = [VerifiedCell.from_dict(c) for c in body["cells"]]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DataError(f"{records} is damaged ({err!r}); move that folder aside") from err
        out += [(folder / c.image, c) for c in cells]
    return out


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under `folder` (a file linked twice counts twice)."""
    total = 0
    for path in Path(folder).rglob("*"):
        with contextlib.suppress(OSError):
            if path.is_file() and not path.is_symlink():
                total += path.stat().st_size
    return total


def prune_oldest(folders: Iterable[Path], over_bytes: int) -> int:
    """Delete whole folders, oldest first (by modification time), until `over_bytes` are freed; returns the bytes
    freed."""
    freed = 0
    for folder in sorted(folders, key=lambda p: p.stat().st_mtime):
        if freed >= over_bytes:
            break
        size = folder_bytes(folder)
        shutil.rmtree(folder, ignore_errors=True)
        freed += size
        logger.info("deleted the cell images of %s (%d kB): above state.cell_images_mb", folder.name, size // 1024)
    return freed


# --- a desktop's folder of reports -------------------------------------------------------------

class PendingCuts:
    """The cuts of one `count --report FOLDER` as it goes: written into a hidden folder, put in place as
    FOLDER/cell_cuts/<specimen>/ (replacing an earlier count's) once the report is written; discarded otherwise."""

    def __init__(self, folder: Path, specimen_id: str):
        self.target = Path(folder) / PENDING / safe_file_stem(specimen_id)
        self.temporary = self.target.parent / f".{self.target.name}.{secrets.token_hex(6)}"
        self.cuts: list[CellCut] = []

    def add(self, first_cell: int, fields: Iterable[str], cuts: Iterable[FieldCut]) -> None:
        """A frame's cuts, its cells numbered from `first_cell` as in the report. Raises LinkFailed."""
        for number, (field, cut) in enumerate(zip(fields, cuts), start=first_cell):
            path = write_cut(self.temporary, f"{number}.png", cut)
            self.cuts.append(pending_cut(number, path, field, cut))

    def finish(self) -> None:
        """Put the cuts in place with their records. Raises LinkFailed, OSError."""
        write_pending_records(self.temporary, [CellCut(c.cell, self.target / c.path.name, c.field, c.x_px, c.y_px,
                                                       c.origin, c.um_per_pixel) for c in self.cuts])
        shutil.rmtree(self.target, ignore_errors=True)
        os.rename(self.temporary, self.target)

    def __enter__(self) -> PendingCuts:
        return self

    def __exit__(self, *exc) -> None:
        """What was not put in place (a count that failed or found nothing) is deleted."""
        shutil.rmtree(self.temporary, ignore_errors=True)


def keep_folder_cells(folder: Path, report: Report) -> Path | None:
    """A report signed in a desktop's folder: its cells kept in FOLDER/verified_cells/ from the cuts its count left in
    FOLDER/cell_cuts/ (then deleted). Returns the folder kept, None (and says why in the log) when there are no cuts:
    the report was counted elsewhere (the device keeps its own), or before cuts were kept. Raises DataError, OSError."""
    pending = Path(folder) / PENDING / safe_file_stem(report.specimen_id)
    cuts = read_pending_records(pending)
    if not cuts:
        logger.info("specimen %s: no cell images in %s (counted on another machine, or without --report): its cells "
                    "are not kept for adapting the model", report.specimen_id, folder)
        return None
    kept = keep_verified(folder, report, cuts)
    shutil.rmtree(pending, ignore_errors=True)
    return kept
