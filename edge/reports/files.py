"""Write a report as JSON, CSV and HTML files, atomically and never through a symlink."""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import io
import json
import logging
import os
import re
import secrets
import stat
import unicodedata
from collections.abc import Iterator
from pathlib import Path

from hematovision.errors import LinkFailed

from hematovision.classes import DIFFERENTIAL, PER_100_WBC, REJECT

from ..counting.checks import FULL_REVIEW, FULL_REVIEW_BANNER
from ..counting.tally import NRBC_CLASS
from .html_page import render_html
from .report import Report, ReportInvalid

logger = logging.getLogger(__name__)

MAX_STEM = 80
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
# A spreadsheet would run a text cell starting with one of these as a formula.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# "role": differential (in the 100%), per_100_wbc (NRBC, beside it), reject (not a white cell),
# unidentified or total; columns are only ever added at the end, so the earlier ones keep their places.
# absolute_10e9_per_l: a differential class's absolute count, when the white count was entered.
# change: on the rows of role "change" (a verified report's audit trail, one row per cell changed before
# signing; class is the new label), "cell N: FROM -> TO by NAME at TIME".
# model_name, model_meta_sha256, model_created_at: the bundle that counted the specimen, on every row (the stamp and
# export time are empty for a report made before reports named them).
CSV_HEADER = ["specimen_id", "class", "count", "percent_of_identified",
              "ci95_low_percent", "ci95_high_percent", "verification", "role", "per_100_wbc",
              "absolute_10e9_per_l", "change", "model_name", "model_meta_sha256", "model_created_at"]
# A verified report's files: <stem>.verified.json, ... beside the preliminary <stem>.json, which stays.
VERIFIED_SUFFIX = ".verified"


def safe_file_stem(specimen_id: str) -> str:
    """A file name stem made from a specimen id that cannot leave its folder.

    Characters other than letters, digits, '.', '_' and '-' become '_', leading and
    trailing dots are dropped; when anything changed a short hash of the id is appended
    so that two different ids never share a file. Raises ReportInvalid for an empty id.
    """
    if not specimen_id.strip():
        raise ReportInvalid("specimen id is empty; scan or type the specimen id again")
    text = unicodedata.normalize("NFKC", specimen_id)
    stem = _UNSAFE.sub("_", text).strip("._-")[:MAX_STEM] or "specimen"
    if stem != specimen_id or stem.endswith(VERIFIED_SUFFIX):  # never the name of another id's verified files
        digest = hashlib.sha256(specimen_id.encode("utf-8", "surrogatepass")).hexdigest()
        stem = f"{stem}-{digest[:10]}"
    return stem


def report_stem(report: Report) -> str:
    """The file name stem of a report: its specimen's, with VERIFIED_SUFFIX once a person signed it."""
    return safe_file_stem(report.specimen_id) + (VERIFIED_SUFFIX if report.verified else "")


def write_report_files(report: Report, folder: Path | str) -> list[Path]:
    """Write <stem>.json, <stem>.csv and <stem>.html into `folder`, each atomically (a verified report as
    <stem>.verified.json, ...: the preliminary files are kept).

    Missing folders are created. Raises ReportInvalid (before writing anything) when the
    report breaks its schema or has an unusable specimen id, LinkFailed when the folder or
    a file name is a symlink or cannot be written.
    """
    Report.from_dict(report.to_dict())  # what is written always follows the schema
    stem = report_stem(report)
    contents = {f"{stem}.json": report_json(report), f"{stem}.csv": report_csv(report),
                f"{stem}.html": render_html(report).encode("utf-8")}
    with open_folder_nofollow(Path(folder)) as dir_fd:
        for name, data in contents.items():
            write_atomic(dir_fd, name, data)
        os.fsync(dir_fd)
    paths = [Path(folder) / name for name in contents]
    logger.info("wrote report %s to %s", report.specimen_id, folder)
    return paths


def check_report_folder(folder: Path | str) -> None:
    """Check, before a count and creating nothing, that reports can be written into `folder`: it, or the
    nearest of its parents that exists, is a writable folder reached through no symlink. Raises LinkFailed
    naming the folder."""
    existing = Path(os.path.abspath(folder))
    while not os.path.lexists(existing):
        existing = existing.parent
    with open_folder_nofollow(existing):
        pass
    if not os.access(existing, os.W_OK | os.X_OK):
        raise LinkFailed(f"cannot write reports into {folder}: {existing} is not writable; give a folder you "
                         "can write to")


def report_json(report: Report) -> bytes:
    text = json.dumps(report.to_dict(), indent=2, ensure_ascii=False, allow_nan=False)
    return (text + "\n").encode("utf-8")


def report_csv(report: Report) -> bytes:
    """One row per differential class, then unidentified, NRBC (per 100 WBC), each rejected class,
    total and (verified) one row per changed cell; UTF-8 with a BOM for spreadsheets. A specimen that needs full
    review (outside_training) gets a line saying so, with why, above the column names: it cannot be read as a
    plain result.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    if report.needs_full_review:
        why = " ".join(f.message for f in report.flags if f.severity == FULL_REVIEW)
        writer.writerow([_csv_text(f"{FULL_REVIEW_BANNER.upper()}. {why}")])
    writer.writerow(CSV_HEADER)
    writer.writerows(_csv_rows(report))
    return buffer.getvalue().encode("utf-8-sig")


def _csv_rows(report: Report) -> list[list]:
    specimen, verification = _csv_text(report.specimen_id), _csv_text(report.verification_text)
    model = [_csv_text(report.model.name), report.model.meta_sha256 or "", _csv_text(report.model.created_at or "")]

    def row(name, count, role, percent=("", "", ""), per="", absolute=None, change=""):
        return [specimen, name, count, *percent, verification, role, per,
                "" if absolute is None else f"{absolute:.3f}", change, *model]

    rows = [row(c.name, c.count, DIFFERENTIAL, (f"{c.percent:.2f}", f"{c.ci95[0]:.2f}", f"{c.ci95[1]:.2f}"),
                absolute=report.absolute(c)) for c in report.classes]
    rows.append(row("unidentified", report.unidentified, "unidentified"))
    if report.nrbc is not None:
        per = "" if report.nrbc.per_100_wbc is None else f"{report.nrbc.per_100_wbc:.2f}"
        rows.append(row(NRBC_CLASS, report.nrbc.count, PER_100_WBC, per=per))
    rows += [row(r.name, r.count, REJECT) for r in report.rejected]
    rows.append(row("total", report.total, "total"))
    rows += [row(c.to_label, "", "change", change=_csv_text(f"cell {c.cell}: {c.from_label} -> {c.to_label} by "
                                                            f"{c.operator} at {c.at}")) for c in report.changes]
    return rows


def _csv_text(value: str) -> str:
    return "'" + value if value.startswith(_FORMULA_START) else value


@contextlib.contextmanager
def open_folder_nofollow(folder: Path) -> Iterator[int]:
    """Open `folder` one component at a time, creating missing ones, following no symlink.

    Yields a directory file descriptor. Raises LinkFailed when a component is a symlink
    or not a folder, or cannot be created.
    """
    path = Path(os.path.abspath(folder))
    fd = os.open(path.anchor, _DIR_FLAGS)
    try:
        for part in path.parts[1:]:
            child = _open_child_folder(fd, part, path)
            os.close(fd)
            fd = child
        yield fd
    finally:
        os.close(fd)


def _open_child_folder(parent_fd: int, name: str, whole: Path) -> int:
    try:
        return _open_folder_at(parent_fd, name, whole)
    except FileNotFoundError:
        pass
    try:
        os.mkdir(name, 0o755, dir_fd=parent_fd)
    except FileExistsError:
        pass
    except OSError as err:
        raise LinkFailed(f"cannot create folder {name!r} in {whole}: {err.strerror}; "
                         "check the drive is mounted and writable") from err
    return _open_folder_at(parent_fd, name, whole)


def _open_folder_at(parent_fd: int, name: str, whole: Path) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except FileNotFoundError:
        raise
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.ENOTDIR):
            raise LinkFailed(f"refusing to write into {whole}: {name!r} is a symlink or not "
                             "a folder; configure the real folder path") from err
        raise LinkFailed(f"cannot open folder {whole}: {err.strerror}") from err


def write_atomic(dir_fd: int, name: str, data: bytes) -> None:
    """Write `name` inside the open folder: temporary file, fsync, rename over the old one.

    Raises LinkFailed when `name` is a symlink or the write fails (the old file is kept).
    """
    _refuse_symlink(dir_fd, name)
    temp = f".{name}.{secrets.token_hex(6)}.tmp"
    try:
        fd = os.open(temp, _FILE_FLAGS, 0o644, dir_fd=dir_fd)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError as err:
        with contextlib.suppress(OSError):
            os.unlink(temp, dir_fd=dir_fd)
        raise LinkFailed(f"cannot write {name}: {err.strerror}; "
                         "check free space and that the folder is writable") from err


def _refuse_symlink(dir_fd: int, name: str) -> None:
    try:
        mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISLNK(mode) or not stat.S_ISREG(mode):
        raise LinkFailed(f"refusing to replace {name!r}: it is a symlink or not a plain file; "
                         "remove it first")


_TEMPORARY = re.compile(r"\..+\.[0-9a-f]{12}\.tmp")  # write_atomic's temporary names


def remove_temporaries(folder: Path | str) -> int:
    """Delete temporary files that a write cut short (a power cut, kill -9) left in `folder`;
    returns how many. Only one writer uses a folder, so any found is an orphan."""
    removed = 0
    with contextlib.suppress(OSError):  # no folder yet, or one the next write will fail on anyway
        for entry in os.scandir(folder):
            if _TEMPORARY.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed += 1
    if removed:
        logger.warning("removed %d temporary file(s) left by an interrupted write in %s", removed, folder)
    return removed
