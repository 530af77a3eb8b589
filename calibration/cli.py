"""`hematovision-calibrate`: make and inspect the microscope's calibration profile; argument parsing and output."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from hematovision.commandline import add_command, new_parser, setup_logging
from hematovision.errors import ConfigError, HematovisionError
from hematovision.pixels import read_rgb

from .capture import capture
from .colour import StainStats, stain_stats
from .correct import apply_blank, correct
from .flatfield import check_exposure, measure_blank, non_uniformity
from .focus import learn_threshold
from .micrometer import pixel_size_from_ruling
from .profile import (
    CalibrationProfile, CameraControls, ColourCalibration, check_image_size, load_profile, profile_to_dict,
    save_profile,
)
from .redcells import RedCellSettings, pixel_size_from_red_cells

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2

DESCRIPTION = """Calibrate a microscope for the counter: flat field and white balance, pixel size, focus, colour.

Each command adds its part to one profile (--profile FILE, JSON); a new profile replaces the old one
only once complete, the previous one kept as FILE.prev. Give the profile to the counter with
`hematovision-edge count --calibration FILE` or the daemon's calibration.profile."""


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would exit the interpreter; main returns 2 instead
        self.print_usage(sys.stderr)
        raise _UsageError(f"{self.prog}: {message}")


def _images(paths: Sequence[str], max_pixels: int | None) -> list[np.ndarray]:
    return [read_rgb(p, max_pixels) for p in paths]


def _open_profile(path: str, shape: tuple[int, ...], create: bool) -> CalibrationProfile:
    """The profile at `path` (its camera size checked against `shape`), or a new one if allowed."""
    if Path(path).exists():
        profile = load_profile(path)
        check_image_size(profile, shape, "the image")
        return profile
    if not create:
        load_profile(path)  # raises the "no such profile" error with what to do
    logger.info("creating a new profile %s for %dx%d frames", path, shape[1], shape[0])
    return CalibrationProfile(image_size=(shape[1], shape[0]))


def _blank_corrected(images: list[np.ndarray], profile: CalibrationProfile) -> list[np.ndarray]:
    return images if profile.blank is None else [apply_blank(im, profile.blank) for im in images]


def cmd_blank(args) -> int:
    if bool(args.camera) == bool(args.images):
        raise _UsageError("blank: give either blank-field IMAGE files or --camera")
    if args.camera:
        captured = capture(args.camera, args.frames)
        images, controls = list(captured.frames), captured.controls
    else:
        images, controls = _images(args.images, args.max_pixels), _controls_from_args(args)
    profile = _open_profile(args.profile, images[0].shape, create=True)
    blank = measure_blank(images)
    profile = profile.updated(blank=blank, camera_controls=controls or profile.camera_controls)
    save_profile(profile, args.profile)
    corrected = apply_blank(images[0], blank)
    print(f"flat field: non-uniformity {non_uniformity(images[0]):.1%} before, {non_uniformity(corrected):.1%} after")
    print(f"white balance (R, G, B gains): {', '.join(f'{g:.3f}' for g in blank.white_balance)}")
    print(f"exposure level: {blank.level:.1%} of full scale over {blank.frames} frame(s)")
    return EXIT_OK


def _controls_from_args(args) -> CameraControls | None:
    if args.exposure_us is None:
        return None
    return CameraControls(int(args.exposure_us), float(args.analogue_gain), tuple(args.colour_gains))


def cmd_micrometer(args) -> int:
    image = capture(args.camera, 1).frames[0] if args.camera else read_rgb(args.image, args.max_pixels)
    check_exposure(image, args.image or "the micrometer frame")
    profile = _open_profile(args.profile, image.shape, create=True)
    size = pixel_size_from_ruling(image, args.division_um)
    save_profile(profile.updated(pixel_size=size), args.profile)
    print(f"um_per_pixel = {size.um_per_pixel:.6f} +/- {size.uncertainty:.6f} ({size.source})")
    return EXIT_OK


def cmd_redcells(args) -> int:
    images = _images(args.images, args.max_pixels)
    for path, image in zip(args.images, images):
        check_exposure(image, path)
    profile = _open_profile(args.profile, images[0].shape, create=True)
    size = pixel_size_from_red_cells(_blank_corrected(images, profile), RedCellSettings(rbc_diameter_um=args.rbc_diameter_um))
    save_profile(profile.updated(pixel_size=size), args.profile)
    print(f"um_per_pixel = {size.um_per_pixel:.6f} +/- {size.uncertainty:.6f} (ESTIMATE: {size.source}, "
          f"assumes a median red-cell diameter of {args.rbc_diameter_um} um; use a stage micrometer to measure it)")
    return EXIT_OK


def cmd_focus(args) -> int:
    images = _images(args.images, args.max_pixels)
    profile = _open_profile(args.profile, images[0].shape, create=False)
    for path, image in zip(args.images, images):
        check_image_size(profile, image.shape, path)
    focus = learn_threshold(_blank_corrected(images, profile))
    save_profile(profile.updated(focus=focus), args.profile)
    print("focus scores: " + ", ".join(f"{s:.3f}" for s in focus.series_scores))
    print(f"focus threshold = {focus.threshold:.3f} (best frame {focus.best_score:.3f})")
    return EXIT_OK


def cmd_colour(args) -> int:
    images = _images(args.images, args.max_pixels)
    profile = _open_profile(args.profile, images[0].shape, create=False)
    for path, image in zip(args.images, images):
        check_image_size(profile, image.shape, path)
        check_exposure(image, path)
    target = read_stain_stats(args.target)
    source = stain_stats(_blank_corrected(images, profile))
    save_profile(profile.updated(colour=ColourCalibration(source=source, target=target)), args.profile)
    print(f"stain statistics of this microscope (Lab mean / std): {_fmt(source.lab_mean)} / {_fmt(source.lab_std)}")
    print(f"mapped toward the training data's: {_fmt(target.lab_mean)} / {_fmt(target.lab_std)}")
    return EXIT_OK


def read_stain_stats(path: str) -> StainStats:
    """Stain statistics from a JSON file: the statistics themselves or a bundle manifest with 'stain_stats'.

    Raises ConfigError naming the file when it cannot be read or holds no statistics.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: cannot read stain statistics ({err}); give the model bundle's JSON") from err
    return StainStats.from_dict(data.get("stain_stats", data) if isinstance(data, dict) else {}, where=path)


def cmd_stain_stats(args) -> int:
    stats = stain_stats(read_rgb(p, args.max_pixels) for p in args.images)
    _write_text(Path(args.out), json.dumps({"stain_stats": stats.to_dict()}, indent=2) + "\n")
    print(f"stain statistics of {stats.images} image(s) (Lab mean / std): {_fmt(stats.lab_mean)} / {_fmt(stats.lab_std)}")
    return EXIT_OK


def _write_text(path: Path, text: str) -> None:
    """Raises ConfigError naming the file when it cannot be written."""
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot write {path}: {err.strerror}; give --out a file in an existing, writable "
                          "folder") from err


def cmd_apply(args) -> int:
    profile = load_profile(args.profile)
    out = correct(read_rgb(args.image, args.max_pixels), profile)
    if not cv2.imwrite(args.out, np.ascontiguousarray(out[:, :, ::-1])):
        raise _UsageError(f"apply: cannot write {args.out}; use a .png, .jpg or .tif name in a writable folder")
    return EXIT_OK


def cmd_show(args) -> int:
    print(format_profile(load_profile(args.profile)))
    return EXIT_OK


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.2f}" for v in values) + ")"


def format_profile(profile: CalibrationProfile) -> str:
    """A readable summary of a profile (the flat-field map summarized, not listed)."""
    d = profile_to_dict(profile)
    lines = [f"calibration profile version {d['version']}, frames {profile.image_size[0]}x{profile.image_size[1]}"]
    if profile.blank is not None:
        gain = profile.blank.gain_array()
        d["blank"]["flat_field_gain"] = f"{gain.shape[1]}x{gain.shape[2]} grid per channel, {gain.min():.3f} to {gain.max():.3f}"
    for key, value in d.items():
        if key not in ("format", "version", "image_size"):
            lines.append(f"{key}: {'not calibrated' if value is None else ''}")
            for name, item in (value or {}).items():
                lines.append(f"  {name}: {_fmt(item) if isinstance(item, list) and len(item) <= 8 else item}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("hematovision-calibrate", DESCRIPTION, parser_class=_Parser)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")
    p = add_command(sub, "blank", "flat field, white balance and exposure from blank-field images")
    p.add_argument("images", nargs="*", metavar="IMAGE")
    p.add_argument("--profile", metavar="PROFILE", help="profile to create or update")
    p.add_argument("--out", metavar="PROFILE", help="deprecated: the old name of --profile")
    p.add_argument("--camera", choices=("picamera2", "opencv"), help="capture the frames instead of reading files")
    p.add_argument("--frames", type=int, default=5, help="frames to capture with --camera")
    p.add_argument("--exposure-us", type=int, help="ExposureTime the image files were taken with (picamera2)")
    p.add_argument("--analogue-gain", type=float, default=1.0, help="AnalogueGain the files were taken with")
    p.add_argument("--colour-gains", type=float, nargs=2, default=(1.0, 1.0), metavar=("RED", "BLUE"),
                   help="ColourGains the files were taken with")
    p.set_defaults(run=cmd_blank)
    p = add_command(sub, "micrometer", "pixel size from a stage-micrometer image")
    p.add_argument("image", nargs="?", metavar="IMAGE")
    p.add_argument("--division-um", type=float, required=True, help="spacing of the ruling's divisions")
    p.add_argument("--profile", required=True, help="profile to create or update")
    p.add_argument("--camera", choices=("picamera2", "opencv"), help="capture the frame instead of reading a file")
    p.set_defaults(run=cmd_micrometer)
    p = add_command(sub, "redcells", "ESTIMATE the pixel size from red-cell diameters (no micrometer)")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--profile", required=True, help="profile to create or update")
    p.add_argument("--rbc-diameter-um", type=float, default=RedCellSettings().rbc_diameter_um,
                   help="median red-cell diameter assumed")
    p.set_defaults(run=cmd_redcells)
    p = add_command(sub, "focus", "focus threshold from a through-focus series")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--profile", required=True, help="profile to update")
    p.set_defaults(run=cmd_focus)
    p = add_command(sub, "colour", "colour transform toward the training data's stain statistics")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--profile", required=True, help="profile to update")
    p.add_argument("--target", required=True, help="JSON with the training data's stain_stats (model bundle)")
    p.set_defaults(run=cmd_colour)
    p = add_command(sub, "stain-stats", "stain statistics of a set of images (for a model bundle)")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.set_defaults(run=cmd_stain_stats)
    p = add_command(sub, "apply", "write the corrected image, as the device corrects frames")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--profile", required=True, help="profile to apply")
    p.add_argument("--out", required=True, help="image file to write (.png, .jpg or .tif)")
    p.set_defaults(run=cmd_apply)
    p = add_command(sub, "show", "print a profile readably")
    p.add_argument("profile", metavar="PROFILE")
    p.set_defaults(run=cmd_show)
    for p in sub.choices.values():
        p.add_argument("--max-pixels", type=_pixel_count, default=None, metavar="N",
                       help="refuse images of more pixels; default: $HEMATOVISION_MAX_PIXELS, else 24 million")
    return parser


def _blank_profile(args) -> None:
    """`blank --out` is the old name of --profile: still taken, with a warning. Raises _UsageError."""
    if args.out is not None:
        if args.profile is not None and args.profile != args.out:
            raise _UsageError("blank: give --profile PROFILE only (--out is its old name)")
        logger.warning("blank --out is deprecated and will be removed: use --profile %s, as the other "
                       "calibrate commands do", args.out)
        args.profile = args.out
    if args.profile is None:
        raise _UsageError("blank: give --profile PROFILE, the profile to create or update")


def _pixel_count(text: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of pixels above 0")
    return int(text)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one calibration command. Returns 0 on success, 1 for refused input, 2 for bad usage."""
    try:
        args = build_parser().parse_args(argv)
        if getattr(args, "command", None) == "micrometer" and bool(args.image) == bool(args.camera):
            raise _UsageError("micrometer: give either one IMAGE or --camera")
        setup_logging(args, normal=logging.WARNING, verbose=logging.INFO)
        if args.command == "blank":
            _blank_profile(args)
        return args.run(args)
    except _UsageError as err:
        print(f"hematovision-calibrate: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except HematovisionError as err:
        print(f"hematovision-calibrate: refused: {err}", file=sys.stderr)
        return EXIT_REFUSED
    except OSError as err:  # a file the library did not expect to fail on: one line, never a traceback
        print(f"hematovision-calibrate: refused: {err.filename or 'a file'}: {err.strerror}; check the path, "
              "its permissions and free space", file=sys.stderr)
        return EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main())
