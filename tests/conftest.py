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
