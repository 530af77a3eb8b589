"""Shared fixtures: the repository's samples and, where present, ../shared/data."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples" / "bccd"
SAMPLES_PBC = REPO / "samples" / "pbc"
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def samples_bccd() -> Path:
    """The committed sample BCCD fields (always present)."""
    return SAMPLES


@pytest.fixture(scope="session")
def samples_pbc() -> Path:
    """The committed sample PBC cells (always present): two single-cell images per class."""
    return SAMPLES_PBC


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or a skip saying why: a user's clone has no shared datasets."""
    if not (SHARED_DATA / "bccd" / "BCCD").is_dir():
        pytest.skip(f"../shared/data not found beside the repository ({SHARED_DATA.name}); "
                    "these tests need the shared datasets, present in CI")
    return SHARED_DATA


TINY = dict(backbone="tiny_cnn", weights="none", input_size=64, batch_size=8,
            head_epochs=3, finetune_epochs=3, patience=10, seed=1)


def train_tiny(out: Path, data_root: Path = SAMPLES, **overrides):
    """A tiny real training run on the sample fields (seconds on two cores)."""
    from hematovision.train.datasets import load_bccd
    from hematovision.train.recipe import RunPaths, TrainConfig, prepare_run, train

    run = RunPaths(out)
    prepare_run(run, TrainConfig(**{**TINY, **overrides}).validate(), load_bccd(data_root))
    train(run)
    return run


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One finished tiny run shared by the training and export tests."""
    return train_tiny(tmp_path_factory.mktemp("tiny_run"))


@pytest.fixture(scope="session")
def lite0_run(tmp_path_factory):
    """A small real transfer-learning run: ImageNet Lite0 at 96 px, head only, on the sample fields."""
    return train_tiny(tmp_path_factory.mktemp("lite0_run"), backbone="efficientnet_lite0",
                      weights="imagenet", input_size=96, head_epochs=25, finetune_epochs=0,
                      head_lr=3e-3, test_fraction=0.3, augment="none")


@pytest.fixture(scope="session")
def tiny_bundle(tiny_run, tmp_path_factory):
    """A device bundle of the tiny run (gate opened wide: it proves plumbing, not accuracy)."""
    from hematovision.export.bundle import ExportOptions, export_run
    from hematovision.export.gate import OPEN

    out = tmp_path_factory.mktemp("tiny_bundle") / "bundle"
    export_run(tiny_run.root, out, ExportOptions(margins=OPEN, calibration_crops=200))
    return out


# The class list of nrbc_bundle: two white-cell classes, nucleated red cells and a reject class.
NRBC_BUNDLE_CLASSES = ("neutrophil", "lymphocyte", "erythroblast", "platelet")


@pytest.fixture(scope="session")
def nrbc_bundle(tiny_bundle, tmp_path_factory):
    """The tiny bundle with its last two outputs named erythroblast and platelet: a real model
    whose bundle names nucleated red cells and a reject class (renamed everywhere the bundle lists
    its classes, then stamped again as `hematovision-export --restamp` would).
    """
    import json
    import shutil

    from hematovision.edge.vision.bundle_meta import stamped

    out = tmp_path_factory.mktemp("nrbc_bundle") / "bundle"
    shutil.copytree(tiny_bundle, out)
    meta = json.loads((out / "bundle.json").read_text())
    meta["classes"] = list(NRBC_BUNDLE_CLASSES)
    for kind in ("float", "int8"):
        meta["metrics"][kind]["classes"] = list(NRBC_BUNDLE_CLASSES)
    (out / "bundle.json").write_text(json.dumps(stamped(meta), indent=2))
    return out


def edited_bundle(bundle: Path, out: Path, edit) -> Path:
    """A copy of `bundle` whose bundle.json `edit(meta)` changed, stamped again as `hematovision-export
    --restamp` would (the model is the same real one)."""
    import json
    import shutil

    from hematovision.edge.vision.bundle_meta import stamped

    shutil.copytree(bundle, out)
    meta = json.loads((out / "bundle.json").read_text())
    edit(meta)
    (out / "bundle.json").write_text(json.dumps(stamped(meta), indent=2))
    return out


# A training lab whose stain colours are far from the sample fields' (L* 73, a* 5, b* -1): dark and blue.
FOREIGN_STAIN = {"keys": ["L_mean", "a_mean", "b_mean", "L_std", "a_std", "b_std"], "images": 50,
                 "mean": [55.0, 2.0, -20.0, 12.0, 6.0, 9.0], "sd": [2.0, 1.0, 2.0, 1.0, 1.0, 1.0]}


@pytest.fixture(scope="session")
def foreign_stain_bundle(tiny_bundle, tmp_path_factory):
    """The tiny bundle as if trained on one lab stained unlike the sample fields: counting them is
    outside its training range (stain)."""
    def edit(meta):
        meta["stain_range"] = {"elsewhere": FOREIGN_STAIN}

    return edited_bundle(tiny_bundle, tmp_path_factory.mktemp("foreign_stain") / "bundle", edit)


@pytest.fixture(scope="session")
def unfamiliar_bundle(foreign_stain_bundle, tmp_path_factory):
    """foreign_stain_bundle whose novelty threshold every cell exceeds: every cell is unlike its training
    cells too (unidentified, and counted as unfamiliar)."""
    def edit(meta):
        meta["novelty"]["threshold"] = 1e-9

    return edited_bundle(foreign_stain_bundle, tmp_path_factory.mktemp("unfamiliar") / "bundle", edit)


# --- the daemon (edge/service/daemon.py): a configuration writer and the command that runs it ---------

DAEMON_COMMAND = ["-c", "import sys; from hematovision.edge.service.daemon import run_main; sys.exit(run_main(sys.argv[1]))"]


def stop_sessions_after(monkeypatch, frames: int) -> None:
    """Make every daemon session of this test end after `frames` frames of its source, as a SIGTERM would."""
    import contextlib

    import hematovision.edge.service.daemon as daemon_module

    real_open = daemon_module.open_source

    @contextlib.contextmanager
    def stopping(config, position, profile=None):
        with real_open(config, position, profile) as source:
            inner, started = source.next_frame, source.position

            def next_frame(stop):
                if source.position - started == frames:
                    stop.set()
                return inner(stop)

            source.next_frame = next_frame
            yield source

    monkeypatch.setattr(daemon_module, "open_source", stopping)


def toml_text(sections: dict) -> str:
    """A TOML file of nested tables of strings, numbers and booleans."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        return f'"{v}"' if isinstance(v, str) else repr(v)

    lines = []
    for name, table in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture
def daemon_config(tmp_path, tiny_bundle, samples_bccd):
    """make(**sections) writes a daemon configuration replaying the sample fields fast, with its
    state in tmp_path/state; keyword arguments replace or add tables, e.g. specimen={"target": 5}.
    """
    def make(name: str = "config.toml", **sections) -> Path:
        base = {
            "model": {"bundle": str(tiny_bundle), "threads": 1},
            "source": {"kind": "replay", "retry_initial_s": 0.05, "retry_max_s": 0.2},
            "source.replay": {"path": str(samples_bccd / "BCCD" / "JPEGImages"), "fps": 1000.0},
            "specimen": {"id": "S-1", "target": 100000},
            "state": {"directory": str(tmp_path / "state"), "min_free_mb": 1},
        }
        for key, table in sections.items():
            base[key.replace("__", ".")] = {**base.get(key.replace("__", "."), {}), **table}
        path = tmp_path / name
        path.write_text(toml_text(base))
        return path

    return make


class NotifyListener:
    """A real NOTIFY_SOCKET: a Unix datagram socket collecting sd_notify messages."""

    def __init__(self, folder: Path):
        import socket

        self.path = folder / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.messages: list[dict[str, str]] = []

    def receive(self, timeout_s: float) -> dict[str, str] | None:
        self.sock.settimeout(timeout_s)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return None
        message = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        self.messages.append(message)
        return message

    def wait_for(self, key: str, timeout_s: float = 30.0, pid: int | None = None) -> dict[str, str]:
        """The next message holding `key` (from `pid` when given, by its MAINPID); fails on timeout."""
        import time

        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            message = self.receive(left)
            if message and key in message and (pid is None or message.get("MAINPID") in (None, str(pid))):
                return message
        raise AssertionError(f"no {key} within {timeout_s} s; got {self.messages[-5:]}")

    def drain(self) -> None:
        while self.receive(0.0001) is not None:
            pass

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_listener():
    """A NotifyListener in a short /tmp folder (socket paths are limited to 107 bytes)."""
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="hv-notify-", dir="/tmp"))
    listener = NotifyListener(folder)
    yield listener
    listener.close()
    shutil.rmtree(folder, ignore_errors=True)
