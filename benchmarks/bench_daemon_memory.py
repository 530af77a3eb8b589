"""Resident memory of the daemon over a long replay: start, end and trend (target <= 250 MB, no growth).

    python benchmarks/bench_daemon_memory.py --model BUNDLE [--minutes 30] [--fps 2] [--target 100]

Runs `hematovision-edge run` as a subprocess on a looping replay of the committed sample fields
(specimens finish at the target and the next starts, so reports are built and filed too), reads
its VmRSS from /proc every few seconds, and prints the figures and a least-squares slope.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples" / "bccd" / "BCCD" / "JPEGImages"
DAEMON = ["-c", "import sys; from hematovision.edge.daemon import run_main; sys.exit(run_main(sys.argv[1]))"]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def write_config(folder: Path, args) -> Path:
    path = folder / "config.toml"
    path.write_text(f"""[model]
bundle = "{args.model.resolve()}"
threads = {args.threads}
[source.replay]
path = "{SAMPLES}"
fps = {args.fps}
loop = true
[specimen]
target = {args.target}
[state]
directory = "{folder / 'state'}"
""")
    return path


def slope_mb_per_hour(samples: list[tuple[float, float]]) -> float:
    n = len(samples)
    mean_t = sum(t for t, _ in samples) / n
    mean_r = sum(r for _, r in samples) / n
    var = sum((t - mean_t) ** 2 for t, _ in samples) or 1.0
    return sum((t - mean_t) * (r - mean_r) for t, r in samples) / var * 3600


def measure(args) -> int:
    with tempfile.TemporaryDirectory(prefix="hv-bench-") as tmp:
        config = write_config(Path(tmp), args)
        proc = subprocess.Popen([sys.executable, *DAEMON, str(config)], stdout=subprocess.DEVNULL,
                                stderr=open(Path(tmp) / "daemon.log", "wb"), cwd=tmp)
        samples, started = [], time.monotonic()
        try:
            time.sleep(args.warmup_s)
            while (elapsed := time.monotonic() - started) < args.minutes * 60 and proc.poll() is None:
                samples.append((elapsed, rss_mb(proc.pid)))
                time.sleep(args.every_s)
        finally:
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(60)
        if not samples:
            sys.exit("the daemon stopped before the first sample:\n" + (Path(tmp) / "daemon.log").read_text()[-2000:])
        report(samples, rc, Path(tmp) / "state" / "state.db", args)
    return 0 if rc == 0 else 1


def report(samples, rc: int, db: Path, args) -> None:
    import sqlite3

    with sqlite3.connect(db) as conn:
        specimens, cells = conn.execute("SELECT COUNT(*), SUM(fields) FROM specimens").fetchone()
        counted = conn.execute("SELECT COUNT(*) FROM cells").fetchone()[0]
    third = max(1, len(samples) // 3)
    first, last = samples[:third], samples[-third:]
    print(f"daemon RSS over {samples[-1][0] / 60:.1f} min replay at {args.fps:g} fps "
          f"({len(samples)} samples, every {args.every_s:g} s, after {args.warmup_s:g} s warm-up):")
    print(f"  start {samples[0][1]:.1f} MB, end {samples[-1][1]:.1f} MB, max {max(r for _, r in samples):.1f} MB")
    print(f"  mean first third {sum(r for _, r in first) / len(first):.1f} MB, "
          f"last third {sum(r for _, r in last) / len(last):.1f} MB, slope {slope_mb_per_hour(samples):+.2f} MB/h")
    print(f"  {cells} frames in {specimens} specimens, {counted} cells counted; exit status after SIGTERM {rc}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path(os.environ.get("HEMATOVISION_MODEL", REPO / "models/reference")))
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--fps", type=float, default=2.0)
    parser.add_argument("--target", type=int, default=100)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--every-s", type=float, default=5.0)
    parser.add_argument("--warmup-s", type=float, default=5.0)
    return measure(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
