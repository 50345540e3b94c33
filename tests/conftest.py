import os
import signal
import subprocess
import time
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


def kill_once_written(command: list[str], records: Path, lines: int, timeout: float = 120, env=None) -> int:
    """Start `command`, SIGKILL it once `records` holds `lines` lines, and return how many it holds
    then (a test of resuming after kill -9); fails if the command ends first."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if records.exists() and records.read_text().count("\n") >= lines:
            break
        time.sleep(0.005)
    assert process.poll() is None, f"the run ended before it could be killed: {process.stderr.read().decode()[-2000:]}"
    process.send_signal(signal.SIGKILL)
    process.wait()
    return records.read_text().count("\n")
