"""`export-cells`: the verified cells kept as a folder of class sub-folders and a CSV, for adapting the model."""

from __future__ import annotations

import csv
import io
import logging
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from hematovision.errors import DataError

from .files import open_folder_nofollow, safe_file_stem, write_atomic
from .verified_cells import VERIFIED, VerifiedCell, read_verified

logger = logging.getLogger(__name__)

CELLS_CSV = "cells.csv"
# x_px, y_px: the cell's centre in its image (which is clipped at the field's edge, so not always its middle).
CSV_COLUMNS = ["path", "label", "original_label", "um_per_pixel", "specimen_id", "cell", "operator", "signed_at",
               "bundle_name", "bundle_meta_sha256", "source_field", "x_px", "y_px"]


@dataclass(frozen=True)
class CellFilter:
    """Which verified cells to export: signed at or after `since` (a time without a zone is local time), of the
    `specimens` named (empty: every specimen)."""

    since: datetime | None = None
    specimens: tuple[str, ...] = ()

    def wants(self, cell: VerifiedCell) -> bool:
        if self.specimens and cell.specimen_id not in self.specimens:
            return False
        return self.since is None or _aware(datetime.fromisoformat(cell.signed_at)) >= _aware(self.since)


def parse_since(text: str) -> datetime:
    """A date (2025-03-01) or an ISO 8601 time. Raises DataError saying how to write it."""
    try:
        return datetime.fromisoformat(text)
    except ValueError as err:
        raise DataError(f"--since {text!r}: give a date such as 2025-03-01, or a time such as "
                        "2025-03-01T14:00") from err


def export_cells(root: Path, out: Path, wanted: CellFilter = CellFilter(), force: bool = False) -> Counter:
    """Copy the verified cells kept under ROOT (verified_cells/) into OUT/<label>/<specimen>_<n>.png and write
    OUT/cells.csv (CSV_COLUMNS, `path` relative to OUT); returns the cells exported by label.

    Raises DataError when OUT is a non-empty folder (without `force`) or a file, when ROOT keeps no verified cells,
    or when none is left by `wanted`; nothing is written then.
    """
    _check_out(Path(out), force)
    cells = _chosen(Path(root), wanted)
    rows = []
    for image, cell in cells:
        name = f"{cell.label}/{safe_file_stem(cell.specimen_id)}_{cell.cell}.png"
        (Path(out) / cell.label).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(image, Path(out) / name)
        rows.append(csv_row(name, cell))
    with open_folder_nofollow(Path(out)) as dir_fd:
        write_atomic(dir_fd, CELLS_CSV, _csv_bytes(rows))
        os.fsync(dir_fd)
    counts = Counter(cell.label for _, cell in cells)
    logger.info("exported %d verified cell(s) to %s: %s", len(rows), out, dict(counts))
    return counts


def csv_row(path: str, cell: VerifiedCell) -> list:
    x, y = cell.centre_in_image
    return [path, cell.label, cell.original_label, f"{cell.um_per_pixel:.6g}", cell.specimen_id, cell.cell,
            cell.operator, cell.signed_at, cell.bundle_name, cell.bundle_meta_sha256, cell.source_field,
            f"{x:.1f}", f"{y:.1f}"]


def _csv_bytes(rows: list[list]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    writer.writerows(rows)
    return buffer.getvalue().encode("utf-8")


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: this is a file; give a folder for the cells (it is created if missing)")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise DataError(f"--out {out}: the folder is not empty; give a new folder, or --force to write into it "
                        "(files of the same names are replaced)")


def _chosen(root: Path, wanted: CellFilter) -> list[tuple[Path, VerifiedCell]]:
    if not root.is_dir():
        raise DataError(f"{root}: no such folder; give the daemon's state folder (--state), the reports folder "
                        "reports were signed in (--reports), or the daemon's configuration (--config)")
    kept = read_verified(root)
    if not kept:
        raise DataError(f"{root / VERIFIED}: no verified cells kept; a report's cells are kept once a person signs "
                        "it on the web page (state.cell_images = true on the device; count --report on a desktop)")
    chosen = [(image, cell) for image, cell in kept if wanted.wants(cell)]
    if not chosen:
        raise DataError(f"none of the {len(kept)} verified cells in {root / VERIFIED} is "
                        f"{_filter_text(wanted)}; widen --since or --specimen")
    missing = [str(image) for image, _ in chosen if not image.is_file()]
    if missing:
        raise DataError(f"{missing[0]} is missing ({len(missing)} image(s) in all); move that specimen's folder "
                        "aside or copy it again")
    return chosen


def _filter_text(wanted: CellFilter) -> str:
    parts = [f"signed at or after {wanted.since.isoformat()}"] if wanted.since else []
    parts += [f"of specimen {', '.join(wanted.specimens)}"] if wanted.specimens else []
    return " and ".join(parts)


def _aware(when: datetime) -> datetime:
    return when if when.tzinfo is not None else when.astimezone()
