"""Generation on Ray replicas (selfalign/generation/replicas.py), on a local CPU Ray of 2 CPUs.

Replicas load tiny-random by name, which rebuilds the same model in every process (checked here).
The tests that need a running Ray share one per module (`local_ray`) and are slow: starting Ray took
20-26 s on this project's 2-core machine, and each set of replicas 15-20 s more (their processes
import torch and build the model). Bad input that needs no running Ray is quick.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO, kill_once_written
from selfalign.ablation import LeaveOneOutConfig
from selfalign.generation import engine_for
from selfalign.profiles import STAGES

SEEDS = str(REPO / "principles" / "seed_prompts.jsonl")


class Settings:
    """What `engine_for` reads of a stage's settings."""

    def __init__(self, replicas=2, ray_address="", batch_size=2):
        self.model, self.backend, self.tensor_parallel_size = "tiny-random", "hf", 1
        self.replicas, self.ray_address, self.batch_size = replicas, ray_address, batch_size


def read(path: Path) -> dict:
    return {row["id"]: row for row in map(json.loads, path.read_text().splitlines())} if path.exists() else {}


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---- bad input, no Ray running ------------------------------------------------------------------

GENERATING = [name for name in STAGES if name != "engrave"]  # engrave trains; every other stage generates


@pytest.mark.parametrize("config_class", [STAGES[name][0] for name in GENERATING] + [LeaveOneOutConfig],
                         ids=lambda c: c.__name__)
def test_replicas_below_one_are_refused(config_class):
    with pytest.raises(ValueError, match="replicas must be > 0, got 0"):
        config_class(replicas=0)
    assert config_class(replicas=3).replicas == 3


def test_without_ray_replicas_name_the_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    with pytest.raises(ImportError, match=r"pip install 'selfalign\[ray\]'"):
        engine_for(Settings(replicas=2))


@pytest.mark.parametrize("where", ["setting", "environment"])
def test_an_address_that_does_not_answer_fails_within_seconds(monkeypatch, where):
    pytest.importorskip("ray", reason="Ray is in the dev extra: pip install -e '.[dev]'")
    address = f"127.0.0.1:{closed_port()}"
    if where == "environment":
        monkeypatch.setenv("RAY_ADDRESS", address)
    start = time.monotonic()
    with pytest.raises(ConnectionError, match="no Ray cluster answers at '127.0.0.1:"):
        engine_for(Settings(replicas=2, ray_address=address if where == "setting" else ""))
    assert time.monotonic() - start < 10


def test_one_replica_never_imports_ray(tmp_path):
    # In a process of its own: this one has imported Ray for the other tests.
    code = f"""
import sys
from selfalign.stages import baseline
baseline.run(baseline.BaselineConfig(run="r", runs_dir={str(tmp_path)!r}, model="tiny-random", prompts={SEEDS!r},
                                     limit=2, max_new_tokens=4))
assert "selfalign.generation.replicas" not in sys.modules
print(sorted(name for name in sys.modules if name == "ray" or name.startswith("ray.")))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
    assert len(read(tmp_path / "r" / "baseline" / "answers.jsonl")) == 2


def test_the_engine_hands_a_backend_with_run_batches_every_batch_at_once():
    """A backend that runs batches itself (as ReplicaBackend does) gets the engine's batches, the
    ones one process would run; its completions land on the same prompts."""
    from test_backends import PROMPTS, FakeBackend

    from selfalign.generation import Engine, SamplingParams

    class Batches(FakeBackend):
        seen = []

        def stream_batch(self, prompts, params, seeds, shared_prefix=None, max_prompt_tokens=None):
            raise AssertionError("the engine should hand its batches to run_batches")

        def run_batches(self, batches, params, shared_prefix, max_prompt_tokens):
            batches = list(batches)  # all of them, as replicas would take them
            self.seen.extend(batches)
            return [FakeBackend.stream_batch(self, p, params, s, shared_prefix, max_prompt_tokens) for p, s in batches]

    params = SamplingParams(temperature=1.0, max_new_tokens=8, seed=5)
    prompts = PROMPTS * 3
    one = Engine(FakeBackend(), batch_size=2, progress=False).generate(prompts, params)
    assert Engine(Batches(), batch_size=2, progress=False).generate(prompts, params) == one
    assert [len(p) for p, _ in Batches.seen] == [2] * 7 + [1]


def test_tiny_random_is_the_same_model_in_every_process():
    # Replicas rebuild it by name; they must all hold the model the driver would.
    from selfalign.models import load_model

    first, second = load_model("tiny-random"), load_model("tiny-random")
    assert first.tokenizer.get_vocab() == second.tokenizer.get_vocab()
    a, b = first.model.state_dict(), second.model.state_dict()
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


# ---- on a local Ray -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray", reason="Ray is in the dev extra: pip install -e '.[dev]'")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture
def ray_cpus(local_ray):
    """The module's Ray, with both CPUs free again after the test (its replicas ended)."""
    yield local_ray
    gc.collect()  # an engine no longer referenced ends its replicas
    deadline = time.monotonic() + 30
    while local_ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)


def stage_two(runs, replicas=1, engine=None, limit=8, **overrides):
    from selfalign.stages import self_align

    settings = {"model": "tiny-random", "max_new_tokens": 24, "batch_size": 1, "min_responses": 0, **overrides}
    config = self_align.SelfAlignConfig(run="r", runs_dir=str(runs), prompts=SEEDS, limit=limit, replicas=replicas,
                                        **settings)
    return self_align.run(config, engine=engine)


STAGE_TWO_FILES = ("calls.jsonl", "responses.jsonl", "drops.jsonl")


@pytest.fixture(scope="module")
def one_replica(tmp_path_factory):
    """Stage 2 on 12 prompts in this process, the reference the replicas must match."""
    runs = tmp_path_factory.mktemp("one")
    stage_two(runs, limit=12)
    return runs / "r" / "self_align"


@pytest.mark.slow
def test_too_many_replicas_are_refused_at_once(ray_cpus):
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"3 replicas of \{'CPU': 1\} each need 3 CPU in all, where the Ray "
                                           r"cluster has 2: Ray cannot place them"):
        engine_for(Settings(replicas=3))
    assert time.monotonic() - start < 5


@pytest.mark.slow
def test_two_replicas_write_the_files_of_one_on_stage_2(ray_cpus, one_replica, tmp_path):
    manifest = stage_two(tmp_path, replicas=2, limit=12)
    assert manifest["status"] == "finished" and manifest["counts"]["prompts"] == 12
    assert "replicas" not in manifest["params"]  # how it ran, not what it computed: a resume may change it
    for name in STAGE_TWO_FILES:
        ours, reference = tmp_path / "r" / "self_align" / name, one_replica / name
        assert ours.exists() == reference.exists(), name
        if reference.exists():
            assert ours.read_bytes() == reference.read_bytes(), name  # same records, in the same order


@pytest.mark.slow
def test_two_replicas_keep_the_prompts_of_one_on_stage_1(ray_cpus, tmp_path):
    from selfalign.stages import prompts

    from selfalign.records import StageFailed

    def stage_one(runs, replicas):
        try:
            prompts.run(prompts.PromptsConfig(run="r", runs_dir=str(runs), model="tiny-random", n_self_instruct=2,
                                              calls_per_round=3, types_limit=2, max_rounds=2, list_max_new_tokens=32,
                                              topic_max_new_tokens=16, question_max_new_tokens=16, batch_size=1,
                                              replicas=replicas))
        except StageFailed:  # random text may hold no list item: a failed stage, whose files compare all the same
            pass
        return runs / "r" / "prompts"

    one, two = stage_one(tmp_path / "one", 1), stage_one(tmp_path / "two", 2)
    assert len(read(one / "calls.jsonl")) >= 6  # two Self-Instruct rounds of three calls, topics, questions
    status = [json.loads((where / "manifest.json").read_text())["status"] for where in (one, two)]
    assert status[0] == status[1], status
    for name in ("calls.jsonl", "prompts.jsonl", "drops.jsonl", "topics.jsonl"):
        assert (two / name).exists() == (one / name).exists(), name
        if (one / name).exists():
            assert (two / name).read_bytes() == (one / name).read_bytes(), name


@pytest.mark.slow
def test_a_replica_killed_mid_stage_is_restarted_and_its_batch_retried(ray_cpus, one_replica, tmp_path):
    engine = engine_for(Settings(replicas=2, batch_size=1), progress=False)
    before = engine.backend.pids()
    calls = tmp_path / "r" / "self_align" / "calls.jsonl"
    killed = {}

    def kill_when_under_way():
        # Both replicas are busy while more than two batches are left: the driver refills at once.
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            if calls.exists() and calls.read_text().count("\n") >= 2:
                killed["written"] = calls.read_text().count("\n")
                os.kill(before[0], signal.SIGKILL)
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_when_under_way)
    killer.start()
    try:
        manifest = stage_two(tmp_path, replicas=2, limit=12, engine=engine)
    finally:
        killer.join()
    assert killed and killed["written"] <= 12 - 3, "the kill came too late to find batches in flight"
    after = engine.backend.pids()
    assert after[0] != before[0] and after[1] == before[1], "Ray restarted the killed replica only"
    engine.backend.close()
    assert manifest["status"] == "finished"
    for name in STAGE_TWO_FILES:
        assert read(tmp_path / "r" / "self_align" / name) == read(one_replica / name), name


@pytest.mark.slow
def test_a_stage_killed_at_one_replica_resumes_on_two_to_the_same_records(ray_cpus, one_replica, tmp_path):
    command = [sys.executable, "-m", "selfalign", "stage", "self-align", "--run", "r", "--runs-dir", str(tmp_path),
               "--model", "tiny-random", "--prompts", SEEDS, "--limit", "12", "--max-new-tokens", "24",
               "--batch-size", "1", "--replicas", "1", "--min-responses", "0"]
    calls = tmp_path / "r" / "self_align" / "calls.jsonl"
    written = kill_once_written(command, calls, 4, timeout=300)
    assert 4 <= written < 12
    manifest = stage_two(tmp_path, replicas=2, limit=12)  # the same settings but for the replica count
    assert manifest["status"] == "finished"
    for name in STAGE_TWO_FILES:
        assert read(tmp_path / "r" / "self_align" / name) == read(one_replica / name), name
    assert [json.loads(line)["id"] for line in calls.read_text().splitlines()] == \
        [json.loads(line)["id"] for line in (one_replica / "calls.jsonl").read_text().splitlines()]


def vllm_model(directory: Path) -> str:
    """tiny-random with heads of 32 (vLLM's CPU attention has no 16), saved; vLLM or a skip."""
    pytest.importorskip("vllm", reason="needs vLLM: `make test-vllm` runs this in .venv-vllm")
    from selfalign.models import tiny_random_model

    model, tokenizer = tiny_random_model(hidden_size=128)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.mark.slow
def test_vllm_on_two_replicas_writes_the_calls_of_one(ray_cpus, tmp_path):
    """vLLM's CPU build in each replica (`make test-vllm` runs this where vLLM is installed): the
    same answers as vLLM in one process, since each prompt's seed comes with it."""
    options = dict(model=vllm_model(tmp_path / "model"), backend="vllm", batch_size=2, score_principles=False)
    stage_two(tmp_path / "one", limit=6, **options)
    stage_two(tmp_path / "two", replicas=2, limit=6, **options)
    one, two = (read(tmp_path / runs / "r" / "self_align" / "calls.jsonl") for runs in ("one", "two"))
    assert len(one) == 6 and {key: row["completion"] for key, row in two.items()} == \
        {key: row["completion"] for key, row in one.items()}


@pytest.mark.slow
def test_vllm_splits_a_replica_over_its_own_workers(ray_cpus, tmp_path):
    """tensor_parallel_size 2 in a replica: vLLM's workers are the replica's own processes (its Ray
    executor fails inside an actor), and greedy answers are those of one worker in one process."""
    from selfalign.generation import SamplingParams
    from selfalign.generation.replicas import Recipe, ReplicaBackend
    from selfalign.generation.vllm import VLLMBackend

    model = vllm_model(tmp_path / "model")
    prompts, params = ["User: hello there", "The quick brown fox"], SamplingParams(temperature=0, max_new_tokens=12)
    alone = VLLMBackend(model).stream_batch(prompts, params, [1, 2])
    split = ReplicaBackend(Recipe(model=model, backend="vllm", tensor_parallel_size=2), 1, engine_for)
    try:
        assert [c.text for c in split.stream_batch(prompts, params, [1, 2])] == [c.text for c in alone]
    finally:
        split.close()
