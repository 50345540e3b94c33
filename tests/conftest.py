import os
from pathlib import Path

import pytest
import torch

# The tiny test models are dominated by per-op overhead, where a second thread only adds contention
# (20x slower when the other core is busy); subprocesses inherit this through the environment.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny():
    from selfalign.models import load_model

    return load_model("tiny-random")


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (it exists in this project's CI, not in a user's clone)")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # Tests must not touch the user's model cache unless they say so (the slow tests do).
    if "SELFALIGN_TEST_CACHE" not in os.environ:
        monkeypatch.setenv("SELFALIGN_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
