"""Shared fixtures for the data tests: the shared Omniglot copy and shard sets packed once."""

import os
from pathlib import Path

import pytest

from fsl_dist.data import shards

REPO = Path(__file__).resolve().parents[1]
# FSL_OMNIGLOT points elsewhere, for a clone whose parent folder has no shared/.
SHARED_OMNIGLOT = Path(os.environ.get("FSL_OMNIGLOT") or REPO.parent / "shared" / "data" / "omniglot")
ZIPS = ("images_background.zip", "images_evaluation.zip")


@pytest.fixture(scope="session")
def omniglot_source() -> Path:
    """The official Omniglot zips beside the project (../shared/data/omniglot, or FSL_OMNIGLOT).

    Without them the data tests skip, unless FSL_REQUIRE_DATA=1 (set by .ci/run): then they
    fail, so that a CI run from a clone that cannot see the data does not pass on skips."""
    missing = [name for name in ZIPS if not (SHARED_OMNIGLOT / name).is_file()]
    if missing:
        reason = (f"Omniglot source not found: {SHARED_OMNIGLOT} lacks {', '.join(missing)}; "
                  f"set FSL_OMNIGLOT to the folder holding {' and '.join(ZIPS)}")
        if os.environ.get("FSL_REQUIRE_DATA") == "1":
            pytest.fail(f"FSL_REQUIRE_DATA=1 but {reason}")
        pytest.skip(reason)
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
