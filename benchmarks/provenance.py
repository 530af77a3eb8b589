"""Where and when a benchmark's figures were measured, and the one writer of every benchmark's --json file."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# What `make results` itself writes: changes there are not changes to the code being measured.
OUTPUTS = ("benchmarks/results", "README.md")


def provenance() -> dict:
    """{"commit", "cores", "date"}: the checked-out commit (short hash, "-dirty" when tracked files
    other than the results differ from it; None outside a git checkout), the machine's CPU cores
    and today's date."""
    return {"commit": commit(), "cores": os.cpu_count(), "date": dt.date.today().isoformat()}


def commit() -> str | None:
    git = ["git", "-C", str(REPO)]
    try:
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        changed = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no", "--", ".",
                                  *(f":(exclude){p}" for p in OUTPUTS)], capture_output=True, text=True,
                                 check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if changed else "")


def repo_path(path: Path | str) -> str:
    """A path as written into a results file: relative to the repository, never this machine's absolute path."""
    return os.path.relpath(Path(path).resolve(), REPO)


def write_result(path: Path, result: dict) -> None:
    """Write `result` to `path` as indented JSON, its provenance first (keys `result` already has, such as
    a provenance taken when a long run started, are kept). The file is replaced whole, never left half written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps({**provenance(), **result}, indent=2) + "\n")
    os.replace(partial, path)
