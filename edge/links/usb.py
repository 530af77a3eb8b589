"""Report link to a USB drive: find the mounted drive, write the report files onto it."""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

from hematovision.errors import ConfigError, LinkFailed

from ..reports.files import remove_temporaries, write_report_files
from ..reports.report import Report
from .serial_port import SendResult

logger = logging.getLogger(__name__)

MEDIA_ROOTS = (Path("/media"), Path("/run/media"))
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class Mount:
    """One line of /proc/mounts."""

    device: str
    mount_point: Path
    fs_type: str
    read_only: bool


@dataclass(frozen=True)
class UsbSettings:
    """Where report files go: a configured mount point, or the one drive under /media."""

    mount_point: Path | None = None
    subfolder: str = "hematovision"
    mounts_file: Path = Path("/proc/mounts")
    media_roots: tuple[Path, ...] = MEDIA_ROOTS


def parse_mounts(text: str) -> list[Mount]:
    """Parse the text of /proc/mounts; octal escapes such as \\040 (space) are decoded."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        point = _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), fields[1])
        mounts.append(Mount(fields[0], Path(point), fields[2], "ro" in fields[3].split(",")))
    return mounts


def choose_drive(mounts: list[Mount], settings: UsbSettings) -> Path:
    """The mount point to write to.

    Raises LinkFailed when the configured drive is not mounted, when no drive or several
    drives are mounted under the media folders, or when the drive is read-only.
    """
    if settings.mount_point is not None:
        found = [m for m in mounts if m.mount_point == Path(settings.mount_point)]
        if not found:
            raise LinkFailed(f"no drive is mounted at {settings.mount_point}; plug in the USB "
                             "drive or correct usb.mount_point")
        return _writable(found[-1])
    found = [m for m in mounts if _under_media(m.mount_point, settings.media_roots)]
    if not found:
        roots = ", ".join(str(r) for r in settings.media_roots)
        raise LinkFailed(f"no USB drive is mounted under {roots}; plug one in")
    if len(found) > 1:
        points = ", ".join(str(m.mount_point) for m in found)
        raise LinkFailed(f"several drives are mounted ({points}); set usb.mount_point to one")
    return _writable(found[0])


def _under_media(point: Path, roots: tuple[Path, ...]) -> bool:
    return any(point != root and point.is_relative_to(root) for root in roots)


def _writable(mount: Mount) -> Path:
    if mount.read_only:
        raise LinkFailed(f"the drive at {mount.mount_point} is mounted read-only; "
                         "check its write-protect switch")
    return mount.mount_point


def write_report_to_usb(report: Report, settings: UsbSettings = UsbSettings()) -> list[Path]:
    """Write the report's JSON, CSV and HTML files into <drive>/<subfolder>/, after removing
    temporary files an interrupted write left there.

    Raises LinkFailed when no suitable drive is mounted, the target is a symlink, or the
    write fails.
    """
    if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*", settings.subfolder):
        raise ConfigError(f"usb.subfolder {settings.subfolder!r} must be one plain folder name "
                          "(letters, digits, '.', '_', '-')")
    try:
        mounts = parse_mounts(Path(settings.mounts_file).read_text("utf-8", "replace"))
    except OSError as err:
        raise LinkFailed(f"cannot read {settings.mounts_file}: {err.strerror}") from err
    drive = choose_drive(mounts, settings)
    remove_temporaries(drive / settings.subfolder)  # a write the drive was pulled (or the power cut) during
    paths = write_report_files(report, drive / settings.subfolder)
    logger.info("report %s written to USB drive %s", report.specimen_id, drive)
    return paths


@dataclass(frozen=True)
class UsbReportLink:
    """ReportLink that writes each report onto the USB drive."""

    settings: UsbSettings = UsbSettings()

    def send(self, report: Report) -> SendResult:
        started = time.monotonic()
        paths = write_report_to_usb(report, self.settings)
        return SendResult("usb", str(paths[0].parent), report.specimen_id, 1, len(paths), 0,
                          time.monotonic() - started)
