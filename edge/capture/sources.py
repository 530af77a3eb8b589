"""Capture stage: frame sources behind one small interface (replay, OpenCV/V4L2, picamera2)."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from hematovision.errors import CameraUnavailable, ConfigError, ImageUnreadable
from hematovision.pixels import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, check_pixels, list_images, read_rgb, to_rgb_uint8

from ..config import Config, OpenCVConfig, Picamera2Config

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Frame:
    """One RGB uint8 frame and its position in the source (frames delivered before it)."""

    image: np.ndarray
    index: int
    name: str


class FrameSource(Protocol):
    """What the daemon needs of a camera or a recording."""

    key: str  # names the source in the state database
    position: int  # frames consumed so far: the index of the next frame

    def next_frame(self, stop: threading.Event) -> Frame | None:
        """The next frame; None when a recording has ended or `stop` was set while waiting.

        Raises CameraUnavailable when the camera stops delivering frames, ImageUnreadable for a
        recorded frame that cannot be read (the position has moved past it).
        """
        ...

    def close(self) -> None: ...


def source_key(config: Config) -> str:
    """Names the configured source in the state database (its position is kept under this name)."""
    kind = config.source.kind
    if kind == "replay":
        return f"replay:{config.resolve(config.source.replay.path)}"
    if kind == "opencv":
        return f"opencv:{config.source.opencv.device}"
    return f"picamera2:{config.source.picamera2.camera}"


@contextlib.contextmanager
def open_source(config: Config, position: int, profile=None) -> Iterator[FrameSource]:
    """The source chosen by `source.kind`, opened at `position` (replay) and closed on exit.

    Raises CameraUnavailable when it cannot be opened.
    """
    kind, limit = config.source.kind, config.source.max_pixels
    if kind == "replay":
        source = open_replay(config.resolve(config.source.replay.path), config.source.replay.fps,
                             config.source.replay.loop, position, limit)
    elif kind == "opencv":
        source = OpenCVSource(config.source.opencv, position, config.source.frame_timeout_s, limit)
    elif kind == "picamera2":
        source = Picamera2Source(config.source.picamera2, position, profile, limit)
    else:  # load_config refuses other kinds
        raise ConfigError(f"source.kind {kind!r} is unknown")
    try:
        yield source
    finally:
        source.close()


class Pacer:
    """Delivers frames at a set rate by waiting on the stop event (never sleep-polling)."""

    def __init__(self, fps: float):
        self.interval = 1.0 / fps
        self.due = time.monotonic()

    def wait(self, stop: threading.Event) -> bool:
        """False when `stop` was set while waiting."""
        delay = self.due - time.monotonic()
        if delay > 0 and stop.wait(delay):
            return False
        self.due = max(self.due + self.interval, time.monotonic())
        return not stop.is_set()


def open_replay(path: Path, fps: float, loop: bool, position: int, max_pixels: int = DEFAULT_MAX_PIXELS):
    """A folder of images or a video file, replayed from `position`. Raises CameraUnavailable."""
    if path.is_dir():
        return FolderReplay(path, fps, loop, position, max_pixels)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        raise CameraUnavailable(f"{path}: replay needs a folder of images or a video, not one image")
    return VideoReplay(path, fps, loop, position, max_pixels)


def checked_frame(image: np.ndarray, index: int, name: str, max_pixels: int, already_rgb: bool) -> Frame:
    """A captured image as a Frame. Raises ImageTooLarge beyond `max_pixels` (the frame is skipped)."""
    check_pixels(image.shape[1], image.shape[0], max_pixels, f"frame {index}")
    return Frame(to_rgb_uint8(image, already_rgb=already_rgb), index, name)


class FolderReplay:
    """The images of a folder in name order, one frame each; larger than `max_pixels`, refused unread."""

    def __init__(self, folder: Path, fps: float, loop: bool, position: int, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.max_pixels = max_pixels
        self.files = list_images(folder) if folder.is_dir() else []
        if not self.files:
            raise CameraUnavailable(f"{folder}: no images to replay; check source.replay.path")
        self.key, self.loop, self.position = f"replay:{folder}", loop, position
        self.pacer = Pacer(fps)
        logger.info("replaying %d images of %s from frame %d", len(self.files), folder, position)

    def next_frame(self, stop: threading.Event) -> Frame | None:
        if (self.position >= len(self.files) and not self.loop) or not self.pacer.wait(stop):
            return None
        index, path = self.position, self.files[self.position % len(self.files)]
        self.position += 1
        try:
            return Frame(read_rgb(path, self.max_pixels), index, path.name)
        except ImageUnreadable as err:
            raise ImageUnreadable(f"replay frame {index}: {err}") from err

    def close(self) -> None:
        pass


class VideoReplay:
    """The frames of a video file, read with OpenCV."""

    def __init__(self, path: Path, fps: float, loop: bool, position: int, max_pixels: int = DEFAULT_MAX_PIXELS):
        import cv2  # noqa: PLC0415

        self.cv2, self.path, self.loop, self.position = cv2, path, loop, position
        self.key, self.pacer, self.max_pixels = f"replay:{path}", Pacer(fps), max_pixels
        self.capture = self._open()
        width, height = (int(self.capture.get(p)) for p in (cv2.CAP_PROP_FRAME_WIDTH, cv2.CAP_PROP_FRAME_HEIGHT))
        if width * height > max_pixels:
            self.capture.release()
            raise CameraUnavailable(f"{path}: frames of {width}x{height} exceed source.max_pixels ({max_pixels}); "
                                    "replay a smaller video or raise the limit")
        self.length = max(int(self.capture.get(cv2.CAP_PROP_FRAME_COUNT)), 0)
        self._skip(position % self.length if loop and self.length else position)

    def _open(self):
        capture = self.cv2.VideoCapture(str(self.path))
        if not capture.isOpened():
            capture.release()
            raise CameraUnavailable(f"{self.path}: not a readable video; check source.replay.path")
        return capture

    def _skip(self, count: int) -> None:
        """Grab and drop frames: exact where seeking by frame number is not in some codecs."""
        for _ in range(count):
            if not self.capture.grab():
                break

    def next_frame(self, stop: threading.Event) -> Frame | None:
        if not self.pacer.wait(stop):
            return None
        ok, image = self.capture.read()
        if not ok and self.loop and self.position:
            self.capture.release()
            self.capture = self._open()
            ok, image = self.capture.read()
        if not ok:
            return None
        self.position += 1
        return checked_frame(image, self.position - 1, f"{self.path.name}#{self.position - 1}", self.max_pixels, False)

    def close(self) -> None:
        self.capture.release()


class OpenCVSource:
    """A USB microscope camera through OpenCV's V4L2 back-end."""

    def __init__(self, settings: OpenCVConfig, position: int, timeout_s: float = 10.0,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        import cv2  # noqa: PLC0415

        self.cv2, self.settings, self.position, self.timeout_s = cv2, settings, position, timeout_s
        self.max_pixels = max_pixels
        device = int(settings.device) if settings.device.isdigit() else settings.device
        self.key = f"opencv:{settings.device}"
        self.capture = cv2.VideoCapture(device, cv2.CAP_V4L2)
        if not self.capture.isOpened():
            self.capture.release()
            raise CameraUnavailable(f"camera {settings.device!r} cannot be opened; check the USB cable, "
                                    "/dev/video* and that the user is in the video group")
        self._configure()

    def _configure(self) -> None:
        cv2, s = self.cv2, self.settings
        wanted = [(cv2.CAP_PROP_FRAME_WIDTH, s.width, "width"), (cv2.CAP_PROP_FRAME_HEIGHT, s.height, "height"),
                  (cv2.CAP_PROP_FPS, s.fps, "fps")]
        for prop, value, name in wanted:
            if value:
                self._set(prop, value, name)
        if hasattr(cv2, "CAP_PROP_READ_TIMEOUT_MSEC"):  # a silent camera fails the read, not hangs it
            self._set(cv2.CAP_PROP_READ_TIMEOUT_MSEC, self.timeout_s * 1000, "read_timeout_msec", quiet=True)
        if s.manual_exposure:
            # V4L2 takes 1 (manual); some OpenCV builds map 0.25 to manual instead.
            if not self._set(cv2.CAP_PROP_AUTO_EXPOSURE, 1, "auto_exposure (manual)", quiet=True):
                self._set(cv2.CAP_PROP_AUTO_EXPOSURE, 0.25, "auto_exposure (manual)")
            self._set(cv2.CAP_PROP_AUTO_WB, 0, "auto_white_balance (off)")

    def _set(self, prop: int, value: float, name: str, quiet: bool = False) -> bool:
        """VideoCapture.set returns False when the driver refuses; the value read back is what counts."""
        accepted = self.capture.set(prop, value)
        actual = self.capture.get(prop)
        if not accepted and not quiet:
            logger.warning("camera %s refused %s = %s (it reports %s)", self.settings.device, name, value, actual)
        elif accepted and name in ("width", "height") and int(actual) != int(value):
            logger.warning("camera %s gives %s %s instead of %s", self.settings.device, name, actual, value)
        return accepted

    def next_frame(self, stop: threading.Event) -> Frame | None:
        if stop.is_set():
            return None
        ok, image = self.capture.read()
        if not ok or image is None:
            raise CameraUnavailable(f"camera {self.settings.device!r} stopped delivering frames; "
                                    "check the USB cable")
        self.position += 1
        return checked_frame(image, self.position - 1, f"frame {self.position - 1}", self.max_pixels, False)

    def close(self) -> None:
        self.capture.release()


class Picamera2Source:
    """The Raspberry Pi camera, with the calibration profile's fixed exposure and colour gains."""

    def __init__(self, settings: Picamera2Config, position: int, profile=None, max_pixels: int = DEFAULT_MAX_PIXELS):
        try:
            from picamera2 import Picamera2  # noqa: PLC0415 - only on the device
        except ImportError as err:
            raise CameraUnavailable("picamera2 is not installed; on the Pi: apt install python3-picamera2 "
                                    "and a venv with --system-site-packages (systemd/install.sh)") from err
        self.position, self.key, self.max_pixels = position, f"picamera2:{settings.camera}", max_pixels
        try:
            self.camera = Picamera2(settings.camera)
            # "BGR888" gives arrays whose last axis is R, G, B: already RGB for this project.
            config = self.camera.create_video_configuration(
                main={"size": (settings.width, settings.height), "format": "BGR888"}, buffer_count=4)
            self.camera.configure(config)
            controls = profile.camera_controls if profile is not None else None
            if controls is not None:
                self.camera.set_controls(controls.to_picamera2())
            self.camera.start()
        except (RuntimeError, OSError, IndexError, ValueError) as err:
            self.close()
            raise CameraUnavailable(f"picamera2 camera {settings.camera} cannot be started ({err}); check the "
                                    "ribbon cable and that no other program uses the camera") from err
        if controls is None:
            logger.warning("no calibration profile with camera controls: picamera2 runs on auto exposure")

    def next_frame(self, stop: threading.Event) -> Frame | None:
        if stop.is_set():
            return None
        try:
            image = self.camera.capture_array("main")
        except (RuntimeError, OSError) as err:
            raise CameraUnavailable(f"picamera2 stopped delivering frames ({err}); check the camera cable") from err
        self.position += 1
        return checked_frame(image, self.position - 1, f"frame {self.position - 1}", self.max_pixels, True)

    def close(self) -> None:
        camera = getattr(self, "camera", None)
        if camera is not None:
            with contextlib.suppress(RuntimeError, OSError):
                camera.stop()
            with contextlib.suppress(RuntimeError, OSError):
                camera.close()
