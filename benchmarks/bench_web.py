"""What the web page costs the frame loop: frames counted per second with the page off, on and idle, and watched.

    python benchmarks/bench_web.py [--model BUNDLE] [--seconds 60] [--repeat 2] [--pollers 1] [--json FILE]

Runs `hematovision-edge run` on a looping replay of the committed sample fields as fast as it goes (no pacing,
one specimen that never reaches its target), three times: [web] off; on with nobody watching; on with
`--pollers` browsers' worth of the live page's requests (GET /api/status every second and the live frame
each time it changed, as edge/web/static/app.js does) plus one client asking ten times a second. Frames per
second come from the state database's frame count after a warm-up; the daemon's peak RSS from /proc. The three
runs are repeated `--repeat` times in turn (the machine's other load drifts); each case's median rate is reported,
and its ratio to web off as the median of the rounds' ratios (a round's three runs follow each other).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from provenance import write_result

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples" / "bccd" / "BCCD" / "JPEGImages"
DAEMON = ["-c", "import sys; from hematovision.edge.cli import main; sys.exit(main(['run', '--config', sys.argv[1]]))"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(folder: Path, args, web: bool, port: int) -> Path:
    path = folder / "config.toml"
    path.write_text(f"""[model]
bundle = "{args.model.resolve()}"
threads = {args.threads}
[source.replay]
path = "{SAMPLES}"
fps = 1000.0
loop = true
[specimen]
target = 100000
[state]
directory = "{folder / 'state'}"
min_free_mb = 1
[report]
folder = ""
[web]
enabled = {'true' if web else 'false'}
port = {port}
""")
    return path


def frames_done(db: Path) -> int:
    try:
        with sqlite3.connect(db, timeout=10) as conn:
            row = conn.execute("SELECT SUM(fields + skipped_blur + skipped_motion + unusable) FROM specimens").fetchone()
    except sqlite3.Error:
        return 0
    return row[0] or 0


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def poll_like_the_page(url: str, every_s: float, stop: threading.Event, counts: dict) -> None:
    """The live page's requests: the status, then the frame whenever its index changed."""
    shown = None
    while not stop.wait(every_s):
        try:
            with urllib.request.urlopen(url + "/api/status", timeout=10) as response:
                live = json.loads(response.read()).get("live") or {}
            counts["status"] += 1
            if live.get("index") != shown:
                shown = live.get("index")
                with urllib.request.urlopen(f"{url}/api/live.jpg?i={shown}", timeout=10) as response:
                    counts["bytes"] += len(response.read())
                counts["frames"] += 1
        except (OSError, ValueError):
            counts["errors"] += 1


def run_case(args, name: str, web: bool, pollers: list[float]) -> dict:
    with tempfile.TemporaryDirectory(prefix="hv-bench-web-") as tmp:
        port = free_port()
        config = write_config(Path(tmp), args, web, port)
        proc = subprocess.Popen([sys.executable, *DAEMON, str(config)], stdout=subprocess.DEVNULL,
                                stderr=open(Path(tmp) / "daemon.log", "wb"), cwd=tmp)
        stop, counts = threading.Event(), {"status": 0, "frames": 0, "bytes": 0, "errors": 0}
        threads = [threading.Thread(target=poll_like_the_page, args=(f"http://127.0.0.1:{port}", every, stop, counts),
                                    daemon=True) for every in pollers]
        db, peak = Path(tmp) / "state" / "state.db", 0.0
        try:
            time.sleep(args.warmup_s)
            for t in threads:
                t.start()
            start_frames, started = frames_done(db), time.monotonic()
            while time.monotonic() - started < args.seconds and proc.poll() is None:
                peak = max(peak, rss_mb(proc.pid))
                time.sleep(1.0)
            frames, elapsed = frames_done(db) - start_frames, time.monotonic() - started
        finally:
            stop.set()
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(60)
        if rc != 0:
            sys.exit(f"{name}: the daemon exited {rc}:\n" + (Path(tmp) / "daemon.log").read_text()[-2000:])
    return {"case": name, "frames": frames, "seconds": round(elapsed, 1), "fps": round(frames / elapsed, 3),
            "peak_rss_mb": round(peak, 1), "requests": counts}


def summary(name: str, runs: list[dict]) -> dict:
    """A case's median frames per second over its runs, its highest RSS, and every run."""
    rates = sorted(r["fps"] for r in runs)
    return {"case": name, "fps": statistics.median(rates), "fps_runs": [r["fps"] for r in runs],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "runs": runs}


def json_result(plan: list[tuple[str, str]], runs: list[list[dict]], args) -> dict:
    """The cases (key, name) with their runs summed up, the first case ("off") the base of the ratios: each round's
    frame rate over that round's web-off rate, and their median (the machine's other load drifts between rounds,
    less within one)."""
    cases = [{"key": key, **summary(name, found)} for (key, name), found in zip(plan, runs)]
    base = cases[0]["fps_runs"]
    for case in cases:
        rounds = [round(fps / off, 3) if off else None for fps, off in zip(case["fps_runs"], base)]
        case["fps_vs_web_off_rounds"] = rounds
        case["fps_vs_web_off"] = statistics.median(rounds) if None not in rounds else None
    return {"cases": cases, "settings": {"seconds": args.seconds, "warmup_s": args.warmup_s, "repeat": args.repeat,
                                         "pollers": args.pollers, "threads": args.threads,
                                         "model": os.path.relpath(args.model.resolve(), REPO)}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path(os.environ.get("HEMATOVISION_MODEL", REPO / "models/reference")))
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--warmup-s", type=float, default=15.0)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--pollers", type=int, default=1, help="browsers watching the live page")
    parser.add_argument("--repeat", type=int, default=2, help="rounds of the three runs")
    parser.add_argument("--json", type=Path, metavar="FILE")
    args = parser.parse_args(argv)
    plan = [("off", "web off", False, []), ("unwatched", "web on, nobody watching", True, []),
            ("watched", f"web on, {args.pollers} live page(s) + 10 requests/s", True, [1.0] * args.pollers + [0.1])]
    runs = [[] for _ in plan]
    for _ in range(args.repeat):
        for i, (_, name, web, pollers) in enumerate(plan):
            runs[i].append(run_case(args, name, web, pollers))
    result = json_result([(key, name) for key, name, _, _ in plan], runs, args)
    for case in result["cases"]:
        print(f"{case['case']:<40} {case['fps']:7.2f} frames/s ({case['fps_vs_web_off']:.1%} of web off, median of "
              f"the rounds' {case['fps_vs_web_off_rounds']}), peak RSS {case['peak_rss_mb']:.0f} MB")
    if args.json:
        write_result(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
