"""check-config's look at the machine: the configured camera, serial port and USB drive are there."""

from __future__ import annotations

import importlib.util
import logging
import stat
from pathlib import Path

from hematovision.errors import ConfigError

from ..config import Config
from ..links.usb import MEDIA_ROOTS, parse_mounts

logger = logging.getLogger(__name__)

MOUNTS_FILE = Path("/proc/mounts")


def check_devices(config: Config, mounts_file: Path = MOUNTS_FILE) -> list[str]:
    """Raises ConfigError naming the key when the camera or serial port the configuration names
    does not exist; returns warnings for what may appear later (a USB drive, or a USB serial adapter,
    not plugged in yet: reports wait in the outbox, counting goes on)."""
    where = str(config.path)
    if config.source.kind == "opencv":
        _check_camera_node(config.source.opencv.device, where)
    if config.source.kind == "picamera2" and importlib.util.find_spec("picamera2") is None:
        raise ConfigError(f"{where}: source.kind = \"picamera2\" but picamera2 is not installed; on the Pi: apt "
                          "install python3-picamera2 and a venv with --system-site-packages (systemd/install.sh)")
    warnings = web_warnings(config)
    if config.report.link in ("astm", "jsonl"):
        return warnings + _check_serial_port(config.report.port, where)
    if config.report.link == "usb":
        return warnings + _usb_warnings(config.report.usb_mount_point, mounts_file)
    return warnings


def web_warnings(config: Config) -> list[str]:
    """The web page's password in a file anyone on the machine can read."""
    try:
        readable = config.web.token and config.path.stat().st_mode & stat.S_IROTH
    except OSError:
        return []
    if readable:
        return [f"web.token is set but {config.path} is readable by every user of this machine; "
                f"sudo chown root:hematovision {config.path} && sudo chmod 640 {config.path}"]
    return []


def _check_camera_node(device: str, where: str) -> None:
    node = Path(f"/dev/video{device}" if device.isdigit() else device)
    if not _is_char_device(node):
        raise ConfigError(f"{where}: source.opencv.device {device!r}: {node} is not a camera device; plug the "
                          "camera in and check its name (ls /dev/video*), or correct source.opencv.device")


# Serial adapters that come and go with a USB plug (and the names udev gives them).
HOTPLUG_SERIAL = ("/dev/ttyUSB", "/dev/ttyACM", "/dev/serial/by-id/", "/dev/serial/by-path/")


def _check_serial_port(port: str, where: str) -> list[str]:
    if "://" in port:  # a pyserial URL (socket://, rfc2217://): nothing on this machine to look at
        return []
    if _is_char_device(Path(port)):
        return []
    if port.startswith(HOTPLUG_SERIAL) and not Path(port).exists():
        return [f"report.port {port}: no serial adapter is plugged in there now; reports wait in the outbox "
                "until one is"]
    raise ConfigError(f"{where}: report.port {port!r} is not a serial device; plug the adapter in and check "
                      "its name (ls /dev/serial/by-id, /dev/ttyUSB*, /dev/ttyGS0 for the USB gadget), or "
                      "set report.link = \"none\"")


def _is_char_device(path: Path) -> bool:
    try:
        return stat.S_ISCHR(path.stat().st_mode)
    except OSError:
        return False


def _usb_warnings(mount_point: str, mounts_file: Path) -> list[str]:
    try:
        mounted = {m.mount_point for m in parse_mounts(mounts_file.read_text("utf-8", "replace"))}
    except OSError:
        return [f"cannot read {mounts_file}: whether a USB drive is mounted is not known"]
    if mount_point:
        if Path(mount_point) not in mounted:
            return [f"report.usb_mount_point {mount_point}: no drive is mounted there now; reports wait in the "
                    "outbox until one is"]
        return []
    if not any(p != root and p.is_relative_to(root) for p in mounted for root in MEDIA_ROOTS):
        return [f"no USB drive is mounted under {', '.join(map(str, MEDIA_ROOTS))} now; reports wait in the "
                "outbox until one is"]
    return []
