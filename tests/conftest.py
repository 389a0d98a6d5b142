"""Shared fixtures for the data tests: the shared Omniglot copy and shard sets packed once."""

from pathlib import Path

import pytest

from fsl_dist.data import shards

REPO = Path(__file__).resolve().parents[1]
SHARED_OMNIGLOT = REPO.parent / "shared" / "data" / "omniglot"
ZIPS = ("images_background.zip", "images_evaluation.zip")


@pytest.fixture(scope="session")
def omniglot_source() -> Path:
    """The official Omniglot zips (re-packed) beside the project: ../shared/data/omniglot."""
    missing = [name for name in ZIPS if not (SHARED_OMNIGLOT / name).is_file()]
    if missing:
        pytest.skip(f"Omniglot source not found: {SHARED_OMNIGLOT} lacks {', '.join(missing)}")
    return SHARED_OMNIGLOT


@pytest.fixture(scope="session")
def packed(omniglot_source, tmp_path_factory):
    """packed(split) -> shard folder of that split, packed at most once per test session."""
    made: dict[str, Path] = {}

    def get(split: str) -> Path:
        if split not in made:
            out = tmp_path_factory.mktemp(f"packed-{split}") / f"omniglot-{split}"
            made[split] = shards.pack_omniglot(omniglot_source, split, out, download=False)
        return made[split]

    return get
