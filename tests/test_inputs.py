"""What the commands read: one image reader with a pixel limit, and every refusal one line naming
the input and the fix, with a non-zero exit and no output written."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from hematovision.errors import ImageTooLarge, ImageUnreadable
from hematovision.image_size import header_size
from hematovision.pixels import read_rgb

REPO = Path(__file__).resolve().parents[1]
FIELD = REPO / "samples" / "bccd" / "BCCD" / "JPEGImages" / "BloodImage_00000.jpg"
EDGE = [sys.executable, "-c", "import sys; from hematovision.edge.cli import main; sys.exit(main(sys.argv[1:]))"]
CALIBRATE = [sys.executable, "-c",
             "import sys; from hematovision.calibration.cli import main; sys.exit(main(sys.argv[1:]))"]
NOBODY = 65534


def huge_png(path: Path, side: int = 20_000) -> Path:
    """A real, decodable PNG of side x side pixels in a few hundred kilobytes (1-bit gray, all black):
    decoded to RGB it would take 1.2 GB."""
    compressor, chunks = zlib.compressobj(9), []
    line = b"\0" * (1 + (side + 7) // 8)
    for _ in range(side):
        chunks.append(compressor.compress(line))
    data = b"".join(chunks) + compressor.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


# Runs a command and prints its peak RSS: the command is forked from this small process, so its
# peak is its own (a child forked from pytest would count pytest's pages it started with).
MEASURE = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode; "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")


def run_measured(cmd: list[str], **kwargs) -> tuple[int, str, float]:
    """Exit status, stderr and peak RSS in MB of one command."""
    result = subprocess.run([sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True, timeout=300,
                            **kwargs)
    return result.returncode, result.stderr, int(result.stdout.split()[-1]) / 1024


def one_error_line(stderr: str, prefix: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


# --- the reader ------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".png", ".jpg", ".bmp", ".tif", ".webp"])
def test_header_size_is_the_decoded_size_for_every_format(suffix):
    image = np.random.default_rng(0).integers(0, 255, (37, 53, 3), np.uint8)
    ok, data = cv2.imencode(suffix, image)
    assert ok and header_size(data.tobytes()) == (53, 37)
    assert header_size(b"not an image") is None and header_size(data.tobytes()[:12]) is None


def test_oversized_image_is_refused_from_its_header_before_decoding(tmp_path):
    big = huge_png(tmp_path / "big.png")
    assert big.stat().st_size < 1_000_000
    with pytest.raises(ImageTooLarge, match=r"20000x20000 is 400\.0 megapixels, over the limit of 24"):
        read_rgb(big)
    small = cv2.imread(str(FIELD))
    with pytest.raises(ImageTooLarge, match="raise the limit"):
        read_rgb(FIELD, max_pixels=small.shape[0] * small.shape[1] - 1)


def test_a_folder_a_pipe_and_a_missing_file_are_refused_by_name(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(ImageUnreadable, match="is a folder, not an image file"):
        read_rgb(tmp_path)
    with pytest.raises(ImageUnreadable, match="not a plain file"):
        read_rgb(tmp_path / "pipe.png")  # never opened: a pipe would block the reader
    with pytest.raises(ImageUnreadable, match="no such file"):
        read_rgb(tmp_path / "absent.png")


def test_count_and_calibrate_refuse_a_400_megapixel_png_in_little_memory(tmp_path):
    big = huge_png(tmp_path / "big.png")
    code, err, rss = run_measured([*EDGE, "count", str(big)], cwd=tmp_path)
    assert code == 1 and "big.png: 20000x20000" in one_error_line(err, "hematovision-edge: error:")
    assert rss < 400, f"count took {rss:.0f} MB"
    code, err, rss_cal = run_measured([*CALIBRATE, "blank", str(big), "--out", str(tmp_path / "p.json")], cwd=tmp_path)
    assert code == 1 and "megapixels" in one_error_line(err, "hematovision-calibrate: refused:")
    assert rss_cal < 400 and not (tmp_path / "p.json").exists()
    print(f"\n400-megapixel PNG of {big.stat().st_size // 1000} kB: count peaked at {rss:.0f} MB RSS, "
          f"calibrate blank at {rss_cal:.0f} MB (the audit saw 1.7 and 2.0 GB before the limit)")


# --- files this user may not read -------------------------------------------------------------

@pytest.fixture
def unreadable(tmp_path):
    """(command prefix, a field this user cannot read): as root the commands run as nobody (setpriv)."""
    folder = Path(tempfile.mkdtemp(prefix="hv-unreadable-"))  # outside pytest's private folder
    folder.chmod(0o755)
    field = folder / "field.jpg"
    shutil.copy(FIELD, field)
    field.chmod(0)
    prefix: list[str] = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root, and setpriv (util-linux) is missing to run the command as another user; "
                        "a root process reads any file, so permission denied cannot happen")
        prefix = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    yield prefix, field
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("command, prefix", [
    (["count"], "hematovision-edge: error:"),
    (["classify"], "hematovision-edge: error:"),
])
def test_an_unreadable_file_is_one_line_naming_it_in_count_and_classify(unreadable, command, prefix):
    runner, field = unreadable
    result = subprocess.run([*runner, *EDGE, *command, str(field)], capture_output=True, text=True, cwd="/",
                            env={**os.environ, "HOME": "/tmp"}, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"{field}: permission denied; make the file readable" in result.stderr


def test_an_unreadable_blank_is_refused_by_calibrate_and_no_profile_written(unreadable):
    runner, field = unreadable
    out = field.parent / "profile.json"
    result = subprocess.run([*runner, *CALIBRATE, "blank", str(field), "--out", str(out)], capture_output=True,
                            text=True, cwd="/", env={**os.environ, "HOME": "/tmp"}, timeout=120)
    assert result.returncode == 1 and not out.exists()
    assert "permission denied" in one_error_line(result.stderr, "hematovision-calibrate: refused:")


# --- runs that read nothing, or nothing usable ------------------------------------------------

def test_count_with_no_readable_input_exits_1_and_writes_no_report(tmp_path):
    (tmp_path / "scan.pdf").write_bytes(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n")
    (tmp_path / "notes.txt").write_text("not an image\n")
    result = subprocess.run([*EDGE, "count", str(tmp_path / "scan.pdf"), str(tmp_path / "notes.txt"),
                             "--report", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    line = one_error_line(result.stderr, "hematovision-edge: error:")
    assert result.returncode == 1 and "none of the 2 input(s) could be counted" in line and "scan.pdf" in line
    assert result.stdout == "" and not (tmp_path / "out").exists()  # no "0.0%, CI 0-100", no report


def test_a_5x5_blank_is_refused_and_no_profile_written(tmp_path):
    cv2.imwrite(str(tmp_path / "tiny.png"), np.full((5, 5, 3), 220, np.uint8))
    result = subprocess.run([*CALIBRATE, "blank", str(tmp_path / "tiny.png"), "--out", str(tmp_path / "p.json")],
                            capture_output=True, text=True, timeout=120)
    line = one_error_line(result.stderr, "hematovision-calibrate: refused:")
    assert result.returncode == 1 and "5x5 pixels are too small for a flat field" in line
    assert not (tmp_path / "p.json").exists()


def test_stain_stats_into_a_missing_folder_is_one_line(tmp_path):
    out = tmp_path / "nonexistent" / "dir" / "x.json"
    result = subprocess.run([*CALIBRATE, "stain-stats", str(FIELD), "--out", str(out)], capture_output=True,
                            text=True, timeout=120)
    line = one_error_line(result.stderr, "hematovision-calibrate: refused:")
    assert result.returncode == 1 and f"cannot write {out}" in line and "existing, writable folder" in line


def test_evaluate_and_export_of_a_missing_run_folder_are_one_line(tmp_path, capsys):
    from hematovision.export.cli import main as export_main
    from hematovision.train.cli import main as train_main

    missing = tmp_path / "no-run"
    assert train_main(["evaluate", str(missing)]) == 1
    assert export_main([str(missing), "--out", str(tmp_path / "bundle")]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 2 and all(f"{missing}: not a training run folder" in e for e in errors)
    assert not (tmp_path / "bundle").exists()


def test_the_daemon_skips_an_oversized_frame_and_counts_the_rest(tmp_path, daemon_config, samples_bccd):
    from hematovision.edge.service.daemon import STATE_FILE, run_main
    from hematovision.edge.service.state import Store

    frames = tmp_path / "frames"
    frames.mkdir()
    for path in sorted((samples_bccd / "BCCD" / "JPEGImages").glob("*.jpg"))[:3]:
        shutil.copy(path, frames / path.name)
    huge_png(frames / "BloodImage_00001b.png")
    assert run_main(daemon_config(source__replay={"path": str(frames)})) == 0
    with Store(tmp_path / "state" / STATE_FILE) as store:
        (specimen,) = [store.specimen(i) for i in store.specimen_ids()]
    assert (specimen.fields, specimen.unusable) == (3, 1)
