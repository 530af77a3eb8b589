"""Capture of reference frames: one thin function per camera type, the camera imported inside it."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from hematovision.errors import CameraUnavailable
from hematovision.pixels import to_rgb_uint8

from .profile import CameraControls

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CapturedFrames:
    """RGB uint8 frames and, for picamera2, the fixed controls they were taken with."""

    frames: tuple[np.ndarray, ...]
    controls: CameraControls | None


def capture_picamera2(count: int, settle_frames: int = 30) -> CapturedFrames:
    """Let auto-exposure and auto-white-balance settle, lock their values, then take `count` frames.

    The locked values become the profile's fixed counting controls, so the software correction is
    measured on frames taken exactly as the device will take them.
    Raises CameraUnavailable when picamera2 or the camera cannot be opened.
    """
    try:
        from picamera2 import Picamera2  # noqa: PLC0415 - only on the device
    except ImportError as err:
        raise CameraUnavailable("picamera2 is not installed; install hematovision[pi] on the Raspberry Pi") from err
    try:
        with Picamera2() as camera:
            camera.configure(camera.create_still_configuration(main={"format": "RGB888"}))
            camera.start()
            for _ in range(settle_frames):
                metadata = camera.capture_metadata()
            controls = CameraControls(
                exposure_time_us=int(metadata["ExposureTime"]), analogue_gain=float(metadata["AnalogueGain"]),
                colour_gains=tuple(float(g) for g in metadata["ColourGains"]),
            )
            camera.set_controls(controls.to_picamera2())
            for _ in range(settle_frames // 3):
                camera.capture_metadata()
            # picamera2's "RGB888" arrays are B, G, R in memory.
            frames = tuple(to_rgb_uint8(camera.capture_array("main"), already_rgb=False) for _ in range(count))
    except (RuntimeError, OSError, KeyError) as err:
        raise CameraUnavailable(f"picamera2 capture failed ({err}); check the camera cable and that no other program uses it") from err
    logger.info("captured %d frame(s) with picamera2, controls %s", count, controls.to_picamera2())
    return CapturedFrames(frames, controls)


def capture_opencv(count: int, device: int | str = 0, settle_frames: int = 30) -> CapturedFrames:
    """Take `count` frames from an OpenCV/V4L2 camera with auto-exposure switched to manual.

    Raises CameraUnavailable when the device cannot be opened or stops delivering frames.
    """
    import cv2  # noqa: PLC0415 - keeps cv2.VideoCapture inside the one function that uses it

    camera = cv2.VideoCapture(device)
    try:
        if not camera.isOpened():
            raise CameraUnavailable(f"camera {device!r} cannot be opened; check the USB cable and /dev/video*")
        for _ in range(settle_frames):
            camera.read()
        camera.set(cv2.CAP_PROP_AUTO_EXPOSURE, 0.25)  # V4L2: 0.25 is manual, 0.75 aperture priority
        camera.set(cv2.CAP_PROP_AUTO_WB, 0)
        frames = []
        for _ in range(count):
            ok, frame = camera.read()
            if not ok:
                raise CameraUnavailable(f"camera {device!r} stopped delivering frames; reconnect it and retry")
            frames.append(to_rgb_uint8(frame, already_rgb=False))
    finally:
        camera.release()
    logger.info("captured %d frame(s) from OpenCV camera %r", count, device)
    return CapturedFrames(tuple(frames), None)


def capture(camera: str, count: int) -> CapturedFrames:
    """Frames from the camera type named `camera` ("picamera2" or "opencv")."""
    if camera == "picamera2":
        return capture_picamera2(count)
    if camera == "opencv":
        return capture_opencv(count)
    raise CameraUnavailable(f"unknown camera type {camera!r}; use picamera2 or opencv")
