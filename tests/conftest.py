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
# The user's cache, read before any test isolates it: tiny-llama is prepared there once (`make test`
# runs `selfalign model prepare --name tiny-llama`), and every test's own cache links to it.
USER_CACHE = Path(os.environ.get("SELFALIGN_CACHE", Path.home() / ".cache" / "selfalign"))


def unavailable(reason: str, in_ci: str = "CI must run it (`make test` prepares what it needs)"):
    """Skip a test whose prerequisite is missing here; fail it in CI, which must run it."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}: {in_ci}", pytrace=False)
    pytest.skip(reason)


def tiny_llama_dir() -> Path:
    """The prepared tiny-llama (LLaMA-1's tokenizer and context, random weights); skips the test
    where it is not prepared, and fails it in CI, which must test the LLaMA shape."""
    from selfalign.models import CONVERSION_VERSION, TINY_LLAMA

    path = USER_CACHE / "models" / f"{TINY_LLAMA}-v{CONVERSION_VERSION}"
    if not (path / "selfalign-conversion.json").is_file():
        unavailable(f"tiny-llama is not prepared in {path}: run `selfalign model prepare --name tiny-llama`")
    return path


@pytest.fixture(scope="session")
def tiny():
    from selfalign.models import load_model

    return load_model("tiny-random")


@pytest.fixture(scope="session")
def tiny_llama():
    """tiny-llama loaded once: LLaMA-1's SentencePiece tokenizer, 2,048 positions, random weights."""
    import dataclasses

    from selfalign.models import TINY_LLAMA, load_model

    return dataclasses.replace(load_model(str(tiny_llama_dir())), name=TINY_LLAMA)


# The two shapes every stage is tested on: our byte-level tiny model, and LLaMA's tokenizer and context.
SHAPES = ("tiny-random", "tiny-llama")


@pytest.fixture(params=SHAPES)
def shape(request):
    """(name, loaded model) of each shape in turn: a stage's `model` setting and the model it runs."""
    fixture = "tiny" if request.param == "tiny-random" else "tiny_llama"
    return request.param, request.getfixturevalue(fixture)


@pytest.fixture
def public_data():
    """The public benchmark data as `selfalign data prepare` wrote it into the user's cache (`make
    test` prepares it); skips the test where it is not prepared, and fails it in CI."""
    from selfalign.public_data import status

    folder = USER_CACHE / "data"
    missing = [f.name for f, state in status(folder) if state != "ok"]
    if missing:
        unavailable(f"the public data is not prepared in {folder} ({', '.join(missing)}): run `selfalign data prepare`")
    return folder


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # Tests must not touch the user's model cache unless they say so (the slow tests do).
    if "SELFALIGN_TEST_CACHE" not in os.environ:
        cache = tmp_path_factory.getbasetemp() / "cache"
        monkeypatch.setenv("SELFALIGN_CACHE", str(cache))
        from selfalign.models import CONVERSION_VERSION, TINY_LLAMA

        # What was prepared once in the user's cache, read through links (tests that prepare set their own cache).
        name = f"{TINY_LLAMA}-v{CONVERSION_VERSION}"
        for prepared, link in ((USER_CACHE / "models" / name, cache / "models" / name),
                               (USER_CACHE / "data", cache / "data")):
            if prepared.is_dir() and not link.exists():
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(prepared, target_is_directory=True)


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
