"""Shared fixtures: the repository's samples and, where present, ../shared/data."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples" / "bccd"
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def samples_bccd() -> Path:
    """The committed sample BCCD fields (always present)."""
    return SAMPLES


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
                      weights="imagenet", input_size=96, head_epochs=12, finetune_epochs=0,
                      head_lr=3e-3, test_fraction=0.3, augment=False)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_run, tmp_path_factory):
    """A device bundle of the tiny run (gate opened wide: it proves plumbing, not accuracy)."""
    from hematovision.export.bundle import ExportOptions, export_run
    from hematovision.export.gate import GateMargins

    out = tmp_path_factory.mktemp("tiny_bundle") / "bundle"
    export_run(tiny_run.root, out, ExportOptions(margins=GateMargins(100.0, 100.0), calibration_crops=200))
    return out
