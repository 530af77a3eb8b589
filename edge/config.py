"""The daemon's one typed configuration: TOML read once, every key and value checked at start."""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from hematovision.errors import ConfigError
from hematovision.pixels import DEFAULT_MAX_PIXELS

DEFAULT_CONFIG = Path("/etc/hematovision/config.toml")
SOURCE_KINDS = ("replay", "opencv", "picamera2")
COUNTING_MODES = ("fields", "scan")
REPORT_LINKS = ("none", "astm", "jsonl", "usb")
# The reference bundle, used when no bundle is configured or given: models/reference in a checkout, and
# the same folder installed as package data (site-packages/hematovision/models/reference) by `pip install .`.
REFERENCE_BUNDLE = Path(__file__).resolve().parents[1] / "models" / "reference"
# The sample PBC cells (two per class) a bundle classifies before it is installed, found the same two ways.
SAMPLE_CELLS = Path(__file__).resolve().parents[1] / "samples" / "pbc"
# The bundles `hematovision-edge model install` keeps, in the state folder: MODELS/current is the one counted with.
MODELS_FOLDER, CURRENT_MODEL = "models", "current"


def default_model() -> Path:
    """The bundle used when none is configured or given: $HEMATOVISION_MODEL, else the reference bundle."""
    return Path(os.environ.get("HEMATOVISION_MODEL", REFERENCE_BUNDLE))


def _opt(default, help: str, *, min=None, max=None, choices=None):
    """A configuration field: its default, what it means, and the values it accepts."""
    return field(default=default, metadata={"help": help, "min": min, "max": max, "choices": choices})


@dataclass(frozen=True)
class ModelConfig:
    bundle: str = _opt("", "model bundle folder; empty: the bundle installed by `hematovision-edge model install` "
                       "(models/current in the state folder), else $HEMATOVISION_MODEL, else the reference bundle")
    threads: int = _opt(0, "TFLite threads; 0: one per core", min=0, max=64)


@dataclass(frozen=True)
class ReplayConfig:
    path: str = _opt("", "folder of field images (name order) or a video file")
    fps: float = _opt(2.0, "frames per second delivered", min=0.01, max=1000.0)
    loop: bool = _opt(False, "start again at the first frame after the last")


@dataclass(frozen=True)
class OpenCVConfig:
    device: str = _opt("/dev/video0", "V4L2 device path or index")
    width: int = _opt(0, "requested frame width; 0: the camera's default", min=0, max=16384)
    height: int = _opt(0, "requested frame height; 0: the camera's default", min=0, max=16384)
    fps: float = _opt(0.0, "requested frame rate; 0: the camera's default", min=0.0, max=240.0)
    manual_exposure: bool = _opt(True, "switch auto-exposure and auto-white-balance off")


@dataclass(frozen=True)
class Picamera2Config:
    width: int = _opt(2028, "frame width", min=64, max=16384)
    height: int = _opt(1520, "frame height", min=64, max=16384)
    camera: int = _opt(0, "camera number", min=0, max=8)


@dataclass(frozen=True)
class SourceConfig:
    kind: str = _opt("replay", "frame source", choices=SOURCE_KINDS)
    frame_timeout_s: float = _opt(10.0, "a source silent this long is reopened", min=0.1, max=3600.0)
    retry_initial_s: float = _opt(1.0, "first wait before reopening a failed source", min=0.01, max=600.0)
    retry_max_s: float = _opt(60.0, "longest wait between reopening attempts", min=0.01, max=3600.0)
    max_pixels: int = _opt(DEFAULT_MAX_PIXELS, "frames with more pixels are refused (replayed files before "
                           "decoding)", min=10_000, max=500_000_000)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    opencv: OpenCVConfig = field(default_factory=OpenCVConfig)
    picamera2: Picamera2Config = field(default_factory=Picamera2Config)


@dataclass(frozen=True)
class CalibrationConfig:
    profile: str = _opt("", "calibration profile (hematovision-calibrate); empty: none")


@dataclass(frozen=True)
class CountingConfig:
    mode: str = _opt("fields", "fields: every frame is a new field; scan: frames overlap and each "
                     "cell is counted once by the tracker", choices=COUNTING_MODES)


@dataclass(frozen=True)
class SpecimenConfig:
    id: str = _opt("", "id of the specimen started automatically; empty: an id from date and time")
    target: int = _opt(100, "identified cells to count before the report", min=1, max=100_000)
    auto_start: bool = _opt(True, "start a specimen when none is open")


@dataclass(frozen=True)
class StateConfig:
    directory: str = _opt("", "state folder (database, reports); empty: $STATE_DIRECTORY, "
                          "else $XDG_STATE_HOME/hematovision")
    min_free_mb: int = _opt(64, "counting stops while less disk space than this is free", min=1, max=1_000_000)
    keep_days: float = _opt(90.0, "cells, thumbnails and report of a delivered specimen are deleted after "
                            "this many days", min=0.0, max=36500.0)
    max_mb: float = _opt(1024.0, "... and oldest first while the database holds more than this", min=1.0,
                         max=1_000_000.0)
    cell_images: bool = _opt(True, "keep an image of each counted cell in its field, so that the cells a person "
                             "verifies can be exported to adapt the model (hematovision-edge export-cells)")
    cell_images_mb: float = _opt(2048.0, "cell images are deleted oldest first while they take more than this: "
                                 "first those of specimens never signed, then verified ones", min=1.0,
                                 max=10_000_000.0)


@dataclass(frozen=True)
class ReportConfig:
    folder: str = _opt("reports", "report files (JSON, CSV, HTML); relative: inside the state "
                       "folder; empty: none")
    link: str = _opt("none", "where each report is sent: a serial receiver (astm, jsonl) or a USB drive",
                     choices=REPORT_LINKS)
    port: str = _opt("", "serial port of an astm or jsonl link, e.g. /dev/ttyUSB0 or /dev/ttyGS0")
    usb_mount_point: str = _opt("", "usb link: the drive's mount point; empty: the one drive under /media")
    baudrate: int = _opt(9600, "serial speed of the link", min=50, max=4_000_000)
    reply_timeout_s: float = _opt(15.0, "astm / jsonl link: wait for each reply of the receiver, or for a "
                                  "receiver that takes no bytes (E1381's 15 s; shorter on a fast local line)",
                                  min=0.1, max=300.0)
    retry_s: float = _opt(60.0, "wait before sending an undelivered report again", min=0.1, max=86400.0)


@dataclass(frozen=True)
class ServiceConfig:
    watchdog_s: float = _opt(30.0, "the unit's WatchdogSec=: every wait of the frame loop must fit in half of "
                             "it (under systemd, WATCHDOG_USEC is used when shorter)", min=1.0, max=3600.0)


@dataclass(frozen=True)
class ChecksConfig:
    """When a specimen is flagged (edge/counting/checks.py), as shares and ratios; `count` uses the defaults."""

    max_unfamiliar_share: float = _opt(0.15, "outside_training when more than this share of the classified "
                                       "cells is unlike the training cells (bundles with a novelty model)",
                                       min=0.0, max=1.0)
    min_cells_for_unfamiliar: int = _opt(20, "... judged once at least this many cells are classified",
                                         min=1, max=100_000)
    stain_sd_limit: float = _opt(4.0, "outside_training when the frames' mean colour statistics lie more than this "
                                 "many of a training lab's standard deviations from it (any channel), for every "
                                 "training lab of the bundle", min=0.5, max=100.0)
    max_pixel_size_ratio: float = _opt(2.0, "outside_training when the pixel size (um per pixel) is more than this "
                                       "many times the bundle's trained pixel size (a lower magnification)",
                                       min=1.0, max=100.0)
    max_unidentified_share: float = _opt(0.10, "too_many_unidentified above this share of the counted white "
                                         "cells", min=0.0, max=1.0)
    min_used_frame_share: float = _opt(0.5, "low_focus when fewer than this share of the frames were sharp "
                                       "enough to count", min=0.0, max=1.0)


@dataclass(frozen=True)
class WebConfig:
    enabled: bool = _opt(False, "serve the web page (live view, specimen entry, review and sign-off)")
    host: str = _opt("127.0.0.1", "address to listen on; another than 127.0.0.1 / ::1 / localhost needs web.token")
    port: int = _opt(8080, "TCP port of the web page", min=1, max=65535)
    token: str = _opt("", "password of the web page and API (at least 12 characters); set, every change "
                      "needs it, and every request from another machine")
    max_request_kb: int = _opt(64, "larger requests are refused (413)", min=1, max=10_240)
    live_width: int = _opt(640, "width in pixels of the live view's frame", min=160, max=4096)
    threads: int = _opt(4, "requests served at once", min=1, max=32)


@dataclass(frozen=True)
class Config:
    """Everything `hematovision-edge run` needs, checked."""

    model: ModelConfig = field(default_factory=ModelConfig)
    source: SourceConfig = field(default_factory=SourceConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    counting: CountingConfig = field(default_factory=CountingConfig)
    specimen: SpecimenConfig = field(default_factory=SpecimenConfig)
    state: StateConfig = field(default_factory=StateConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    checks: ChecksConfig = field(default_factory=ChecksConfig)
    web: WebConfig = field(default_factory=WebConfig)
    path: Path = field(default=Path("config.toml"), metadata={"internal": True})

    def resolve(self, value: str) -> Path:
        """An input path of this file: relative paths are relative to the file's folder."""
        path = Path(value).expanduser()
        return path if path.is_absolute() else (self.path.resolve().parent / path).resolve()

    def bundle_path(self) -> Path:
        """model.bundle; empty: the installed bundle (models/current in the state folder) where there is one, else
        $HEMATOVISION_MODEL or the reference bundle."""
        if self.model.bundle:
            return self.resolve(self.model.bundle)
        installed = self.models_dir() / CURRENT_MODEL
        return installed if installed.exists() else default_model()

    def models_dir(self) -> Path:
        """Where `hematovision-edge model install` keeps the bundles."""
        return self.state_dir() / MODELS_FOLDER

    def state_dir(self) -> Path:
        if self.state.directory:
            return self.resolve(self.state.directory)
        if os.environ.get("STATE_DIRECTORY"):
            return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
        base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
        return Path(base) / "hematovision"

    def report_dir(self) -> Path | None:
        return self.state_dir() / self.report.folder if self.report.folder else None


def load_config(path: str | Path = DEFAULT_CONFIG) -> Config:
    """Read and check a TOML configuration file.

    Raises ConfigError naming the file, the key and the fix: a missing or unreadable file,
    TOML syntax, an unknown key, a value of the wrong type or out of range, a path that does
    not exist.
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text("utf-8"))
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the configuration ({err.strerror}); "
                          "pass --config FILE or copy systemd/config.example.toml there") from err
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"{path}: not valid TOML ({err}); fix the syntax") from err
    config = dataclasses.replace(build_section(Config, data, str(path), ""), path=path)
    check_config(config)
    return config


def build_section(cls, data: object, where: str, prefix: str):
    """A section dataclass from its TOML table; every key known, every value checked."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: [{prefix.rstrip('.')}] must be a table")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key {prefix}{unknown[0]}; known keys here: "
                          f"{', '.join(prefix + k for k in fields)}")
    values = {}
    for name, value in data.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            values[name] = build_section(kind, value, where, f"{prefix}{name}.")
        else:
            values[name] = check_value(fields[name], kind, value, f"{where}: {prefix}{name}")
    return cls(**values)


def check_value(f: dataclasses.Field, kind: type, value: object, key: str):
    """One value against its type, range and choices. Raises ConfigError naming the key."""
    meta = f.metadata
    value = _typed(kind, value, key, meta["help"])
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{key} = {value!r} is not allowed; use one of {', '.join(meta['choices'])}")
    low, high = meta.get("min"), meta.get("max")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ConfigError(f"{key} = {value!r} is out of range; use a value from {low} to {high} "
                          f"({meta['help']})")
    return value


def _typed(kind: type, value: object, key: str, help: str):
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if (kind in (float, int) and isinstance(value, bool)) or not isinstance(value, kind):
        raise ConfigError(f"{key} = {value!r} must be {_type_name(kind)} ({help})")
    if kind is str and any(ord(c) < 32 for c in value):
        raise ConfigError(f"{key} holds a control character; write it on one line")
    if kind is float and value != value:
        raise ConfigError(f"{key} is nan; give a number")
    return value


def _type_name(kind: type) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(
        kind, getattr(kind, "__name__", str(kind)))


def check_config(config: Config) -> None:
    """Checks across keys and of the files named. Raises ConfigError naming the key."""
    where = str(config.path)
    source = config.source
    if source.retry_max_s < source.retry_initial_s:
        raise ConfigError(f"{where}: source.retry_max_s ({source.retry_max_s}) is below "
                          f"source.retry_initial_s ({source.retry_initial_s}); raise it")
    if source.kind == "replay":
        _check_replay(config, where)
    if config.calibration.profile and not config.resolve(config.calibration.profile).is_file():
        raise ConfigError(f"{where}: calibration.profile {config.calibration.profile!r} does not exist "
                          f"({config.resolve(config.calibration.profile)}); run hematovision-calibrate "
                          "or leave it empty")
    bundle = config.bundle_path()
    if not (bundle / "bundle.json").is_file():
        raise ConfigError(f"{where}: model.bundle: {bundle} is not a model bundle (no bundle.json); "
                          "set model.bundle to the folder hematovision-export wrote")
    if config.report.link in ("astm", "jsonl") and not config.report.port:
        raise ConfigError(f"{where}: report.link = {config.report.link!r} needs report.port "
                          "(e.g. /dev/ttyUSB0); or set report.link = \"none\"")
    if config.specimen.id and not config.specimen.id.strip():
        raise ConfigError(f"{where}: specimen.id is blank; give an id or leave it empty (\"\")")
    if source.kind == "picamera2":
        camera = source.picamera2
        if camera.width * camera.height > source.max_pixels:
            raise ConfigError(f"{where}: source.picamera2 frames of {camera.width}x{camera.height} exceed "
                              f"source.max_pixels ({source.max_pixels}); lower the size or raise the limit")
    check_timings(config, config.service.watchdog_s)
    check_web(config.web, where)


LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
MIN_TOKEN = 12


def check_web(web: WebConfig, where: str) -> None:
    """A web page listening beyond this machine has a password, and a password is not a short one.
    Raises ConfigError naming the key and the fix."""
    if web.token and (len(web.token) < MIN_TOKEN or web.token != web.token.strip()):
        raise ConfigError(f"{where}: web.token is shorter than {MIN_TOKEN} characters or starts or ends with a "
                          "space; choose a longer password (e.g. the output of: openssl rand -hex 16)")
    if web.enabled and web.host not in LOOPBACK_HOSTS and not web.token:
        raise ConfigError(f"{where}: web.host = {web.host!r} lets other machines reach the web page, which then "
                          "needs a password: set web.token (e.g. the output of: openssl rand -hex 16), or "
                          "web.host = \"127.0.0.1\"")


def frame_loop_waits(config: Config, every_key: bool = True) -> dict[str, float]:
    """The longest waits of the frame loop between two frames, by the key that sets them; without
    `every_key` only those of the configured source (frame_timeout_s bounds a camera read)."""
    source = config.source
    waits = {"source.frame_timeout_s": source.frame_timeout_s} if every_key or source.kind == "opencv" else {}
    if source.kind == "replay":
        waits["source.replay.fps"] = 1.0 / source.replay.fps
    if source.kind == "opencv" and source.opencv.fps:
        waits["source.opencv.fps"] = 1.0 / source.opencv.fps
    return waits


def check_timings(config: Config, watchdog_s: float, every_key: bool = True) -> None:
    """Every wait of the frame loop fits in half the watchdog interval, the rest being the frame's
    own work. Raises ConfigError naming the key and the fix."""
    for key, seconds in frame_loop_waits(config, every_key).items():
        if seconds > watchdog_s / 2:
            shown = f"{seconds:g} s" if key.endswith("_s") else f"one frame every {seconds:g} s"
            raise ConfigError(f"{config.path}: {key} gives {shown}, longer than half the watchdog interval "
                              f"({watchdog_s:g} s, service.watchdog_s / WatchdogSec=): systemd would kill the "
                              "daemon between frames; shorten it (or raise WatchdogSec= and service.watchdog_s together)")


def _check_replay(config: Config, where: str) -> None:
    replay = config.source.replay
    if not replay.path:
        raise ConfigError(f"{where}: source.replay.path is empty; name a folder of images or a video "
                          "(paths are relative to the configuration file)")
    path = config.resolve(replay.path)
    if not path.exists():
        raise ConfigError(f"{where}: source.replay.path {replay.path!r} does not exist ({path}); "
                          "correct the path (relative paths start at the configuration file's folder)")


def describe(cls=Config, prefix: str = "") -> list[str]:
    """Every key with its default and meaning, for documentation and error messages."""
    lines = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        if f.default_factory is not dataclasses.MISSING:
            lines += describe(f.default_factory().__class__, f"{prefix}{f.name}.")
        else:
            lines.append(f"{prefix}{f.name} = {f.default!r}: {f.metadata['help']}")
    return lines

