"""Resident memory of the daemon over a long replay: start, end and trend (target <= 250 MB, no growth).

    python benchmarks/bench_daemon_memory.py --model BUNDLE [--minutes 30] [--fps 2] [--target 100] [--web] [--json FILE]

Runs `hematovision-edge run` as a subprocess on a looping replay of the committed sample fields
(specimens finish at the target and the next starts, so reports are built and filed too), reads
its VmRSS from /proc every few seconds, and prints the figures and a least-squares slope. With `--web` the daemon
serves its web page and a thread asks it what a watching live page asks (the status every second, the frame
whenever it changed; benchmarks/bench_web.py), and reviews and signs each finished specimen's report.
`--json FILE` also writes them as one JSON object: the keys benchmarks/results_table.py reads
(minutes, start_mb, end_mb, max_mb, first_third_mb, last_third_mb), then the slope, the settings,
the daemon's work and exit status, and every (seconds, MB) sample.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

from provenance import write_result

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples" / "bccd" / "BCCD" / "JPEGImages"
DAEMON = ["-c", "import sys; from hematovision.edge.service.daemon import run_main; sys.exit(run_main(sys.argv[1]))"]


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
[web]
enabled = {'true' if args.web else 'false'}
port = {args.port}
""")
    return path


def watch_and_review(url: str, stop: threading.Event, use: dict) -> None:
    """A live page watching (bench_web.poll_like_the_page), and every finished specimen reclassified and signed;
    what was done is counted in `use` (an answer that is not the API's is an error, counted, never hidden)."""
    from bench_web import poll_like_the_page

    threading.Thread(target=poll_like_the_page, args=(url, 1.0, stop, use), daemon=True).start()
    while not stop.wait(10.0):
        try:
            for entry in api(url, "GET", "/api/specimens"):
                if entry["state"] == "preliminary":
                    review_and_sign(url, entry["specimen_id"], use)
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            use["errors"] += 1


def review_and_sign(url: str, specimen_id: str, use: dict) -> None:
    """One cell of the report relabelled (when it has cells), then the report signed, as a technician does."""
    path = f"/api/specimens/{urllib.parse.quote(specimen_id, safe='')}"
    report = api(url, "GET", path + "?thumbnails=0")
    if report["cells"]:
        cell = report["cells"][0]
        api(url, "POST", f"{path}/cells/{cell['id']}",
            {"label": "unidentified" if cell["label"] != "unidentified" else "lymphocyte"})
        use["reclassified"] += 1
    api(url, "POST", path + "/sign", {"operator": "bench"})
    use["signed"] += 1


def page_use() -> dict:
    """What the watching and reviewing threads did: requests of the live page, cells reclassified, reports
    signed, failed requests."""
    return {"status": 0, "frames": 0, "bytes": 0, "reclassified": 0, "signed": 0, "errors": 0}


def api(url: str, method: str, path: str, body: dict | None = None):
    request = urllib.request.Request(url + path, method=method, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


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
        samples, started, stop, use = [], time.monotonic(), threading.Event(), page_use()
        if args.web:
            threading.Thread(target=watch_and_review, args=(f"http://127.0.0.1:{args.port}", stop, use),
                             daemon=True).start()
        try:
            time.sleep(args.warmup_s)
            while (elapsed := time.monotonic() - started) < args.minutes * 60 and proc.poll() is None:
                samples.append((elapsed, rss_mb(proc.pid)))
                time.sleep(args.every_s)
        finally:
            stop.set()
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(60)
        if not samples:
            sys.exit("the daemon stopped before the first sample:\n" + (Path(tmp) / "daemon.log").read_text()[-2000:])
        work = work_done(Path(tmp) / "state" / "state.db")
        result = figures(samples, rc, {**work, "web": dict(use)} if args.web else work, args)
    report(result)
    if args.json:
        write_result(args.json, result)
    return 0 if rc == 0 else 1


def work_done(db: Path) -> dict:
    """Specimens, frames and counted cells in the daemon's state database."""
    import sqlite3

    with sqlite3.connect(db) as conn:
        specimens, frames = conn.execute("SELECT COUNT(*), SUM(fields) FROM specimens").fetchone()
        counted = conn.execute("SELECT COUNT(*) FROM cells").fetchone()[0]
    return {"specimens": specimens, "frames": frames or 0, "cells_counted": counted}


def figures(samples: list[tuple[float, float]], rc: int, work: dict, args) -> dict:
    """The figures as JSON: first the keys results_table.py reads, then the rest."""
    third = max(1, len(samples) // 3)
    first, last = samples[:third], samples[-third:]
    return {"minutes": samples[-1][0] / 60, "start_mb": samples[0][1], "end_mb": samples[-1][1],
            "max_mb": max(r for _, r in samples), "first_third_mb": sum(r for _, r in first) / len(first),
            "last_third_mb": sum(r for _, r in last) / len(last), "slope_mb_per_hour": slope_mb_per_hour(samples),
            "settings": {"model": os.path.relpath(args.model.resolve(), REPO), "minutes": args.minutes,
                         "fps": args.fps, "target": args.target, "threads": args.threads,
                         "every_s": args.every_s, "warmup_s": args.warmup_s, "web": args.web},
            **work, "exit_status": rc, "samples": [[round(t, 2), round(r, 2)] for t, r in samples]}


def report(f: dict) -> None:
    s = f["settings"]
    print(f"daemon RSS over {f['minutes']:.1f} min replay at {s['fps']:g} fps "
          f"({len(f['samples'])} samples, every {s['every_s']:g} s, after {s['warmup_s']:g} s warm-up):")
    print(f"  start {f['start_mb']:.1f} MB, end {f['end_mb']:.1f} MB, max {f['max_mb']:.1f} MB")
    print(f"  mean first third {f['first_third_mb']:.1f} MB, last third {f['last_third_mb']:.1f} MB, "
          f"slope {f['slope_mb_per_hour']:+.2f} MB/h")
    print(f"  {f['frames']} frames in {f['specimens']} specimens, {f['cells_counted']} cells counted; "
          f"exit status after SIGTERM {f['exit_status']}")
    if f.get("web"):
        w = f["web"]
        print(f"  web page: {w['status']} status and {w['frames']} frame requests, {w['reclassified']} cells "
              f"reclassified, {w['signed']} reports signed, {w['errors']} failed requests")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path(os.environ.get("HEMATOVISION_MODEL", REPO / "models/reference")))
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--fps", type=float, default=2.0)
    parser.add_argument("--target", type=int, default=100)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--every-s", type=float, default=5.0)
    parser.add_argument("--warmup-s", type=float, default=5.0)
    parser.add_argument("--web", action="store_true", help="serve the web page, watched and used as a person would")
    parser.add_argument("--port", type=int, default=18080, help="the web page's port with --web")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the figures to FILE as one JSON object")
    return measure(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
