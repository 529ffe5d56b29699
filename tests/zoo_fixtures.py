"""Shared by the probe tests that run on zoo scenes: the held-out stream, written as a dataset."""

from __future__ import annotations

import pytest

from workers.probes import zoo
from workers.probes.zoo import world

#: The zoo's held-out stream (never seen in training).
HELDOUT_SEED = zoo.SPLITS["heldout"].seed


def heldout_fixture(n: int):
    """A module-scoped ``heldout`` fixture: the first ``n`` held-out scenes in the dataset format
    (``annotations.jsonl`` + ``scenes.jsonl``). Use as ``heldout = heldout_fixture(16)``."""

    @pytest.fixture(scope="module")
    def heldout(tmp_path_factory):
        out = tmp_path_factory.mktemp(f"heldout{n}")
        world.write_dataset(out, world.sample_scenes(HELDOUT_SEED, n))
        return out

    return heldout
