"""Training checkpoints load without unpickling anything: a planted pickle is refused, never run,
and a normal resume still ends with the adapter an uninterrupted run makes."""

import json
import os
import pathlib
import pickle
import random
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from selfalign.models import LoadedModel, tiny_random_model
from selfalign.chat_format import ChatFormat
from selfalign.training import CheckpointError, TrainSettings, build_examples, train_lora

CHAT = ChatFormat.load()
# 8 examples in micro-batches of 4 for 3 epochs: 6 steps, checkpoints at 2, 4 and 6 (the last two kept).
SETTINGS = dict(epochs=3, micro_batch_size=4, learning_rate=3e-2, warmup_steps=1, checkpoint_every=2,
                lora_dropout=0.1)  # dropout, so a resume that lost the random states would differ


class Planted:
    """Unpickling it creates `marker`: what a crafted checkpoint could do with any code."""

    def __init__(self, marker):
        self.marker = pathlib.Path(marker)

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def train(out_dir, **changes):
    model, tokenizer = tiny_random_model()
    loaded = LoadedModel(model, tokenizer, "tiny-random", None)
    records = [{"id": f"x{i}", "prompt": f"Question {i}", "answer": f"The answer is {i * 7}."} for i in range(8)]
    examples, _ = build_examples(records, loaded, CHAT, 256)
    return train_lora(loaded, examples, TrainSettings(**{**SETTINGS, **changes}), out_dir, seed=0, progress=False)


def adapter(out_dir):
    return load_file(str(out_dir / "adapter" / "adapter_model.safetensors"))


def kill_after_step_4(out_dir):
    """What a run killed between steps 4 and 6 leaves: no adapter, no step-6 checkpoint."""
    shutil.rmtree(out_dir / "adapter")
    shutil.rmtree(out_dir / "checkpoints" / "step-6")
    return out_dir / "checkpoints" / "step-4"


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("whole")
    train(out_dir)
    return out_dir


def test_checkpoints_are_safetensors_and_json_only(whole):
    files = sorted(p.name for p in (whole / "checkpoints" / "step-6").iterdir())
    assert files == ["adapter.safetensors", "complete.json", "optimizer.json", "optimizer.safetensors",
                     "rng-0.json", "rng-0.safetensors", "scheduler.json"]
    assert json.loads((whole / "checkpoints" / "step-6" / "complete.json").read_text()) == {
        "step": 6, "format": "safetensors+json"}


def test_a_resumed_run_ends_with_the_same_adapter(whole, tmp_path):
    shutil.copytree(whole, tmp_path, dirs_exist_ok=True)
    kill_after_step_4(tmp_path)
    # Whatever the process did before resuming must not matter: the checkpoint's random states win.
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    assert train(tmp_path)["resumed_from"] == 4
    expected, found = adapter(whole), adapter(tmp_path)
    assert expected.keys() == found.keys()
    for name in expected:
        assert torch.equal(found[name], expected[name]), name


def plant_old_format(checkpoint, marker):
    """Make `checkpoint` look like one accelerate's save_state wrote, its pickles booby-trapped."""
    step = json.loads((checkpoint / "complete.json").read_text())["step"]
    for path in checkpoint.iterdir():
        path.unlink()
    for name in ("custom_checkpoint_0.pkl", "optimizer.bin", "random_states_0.pkl"):
        torch.save(Planted(marker), checkpoint / name)
    (checkpoint / "complete.json").write_text(json.dumps({"step": step}) + "\n")


def test_the_planted_pickle_would_run_code(tmp_path):
    # The refusals below mean something only if loading the planted file does run code.
    torch.save(Planted(tmp_path / "ran"), tmp_path / "planted.pkl")
    torch.load(tmp_path / "planted.pkl", weights_only=False)
    assert (tmp_path / "ran").exists()


def test_an_old_format_checkpoint_is_refused_unless_pickles_are_allowed(whole, tmp_path, capsys):
    from selfalign.cli import main

    shutil.copytree(whole, tmp_path / "run", dirs_exist_ok=True)
    marker = tmp_path / "code-ran"
    plant_old_format(kill_after_step_4(tmp_path / "run"), marker)
    with pytest.raises(CheckpointError, match="--allow-pickle.*--restart") as refused:
        train(tmp_path / "run")
    assert "custom_checkpoint_0.pkl" in str(refused.value) and "optimizer.bin" in str(refused.value)
    assert not marker.exists()

    # Through the command, the same refusal is one line.
    stage = tmp_path / "runs" / "r" / "engrave"
    responses = tmp_path / "responses.jsonl"
    responses.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"Q {i}?", "answer": f"A {i}."}) + "\n"
                                 for i in range(6)))
    command = ["stage", "engrave", "--run", "r", "--runs-dir", str(tmp_path / "runs"), "--model", "tiny-random",
               "--responses", str(responses), "--epochs", "1", "--holdout", "0", "--identity", ""]
    assert main(command) == 0
    plant_old_format(next((stage / "checkpoints").iterdir()), marker)
    shutil.rmtree(stage / "adapter")
    capsys.readouterr()
    assert main(command) == 1
    error = capsys.readouterr().err
    assert error.startswith("selfalign: error: checkpoint ") and error.count("\n") == 1, error
    assert "--allow-pickle" in error and "--restart" in error
    assert not marker.exists()


@pytest.mark.parametrize("planted_as", ["scheduler.json", "optimizer.safetensors", "adapter.safetensors",
                                        "rng-0.json"])
def test_a_pickle_in_place_of_a_checkpoint_file_is_never_unpickled(whole, tmp_path, planted_as):
    shutil.copytree(whole, tmp_path / "run", dirs_exist_ok=True)
    marker = tmp_path / "code-ran"
    checkpoint = kill_after_step_4(tmp_path / "run")
    (checkpoint / planted_as).write_bytes(pickle.dumps(Planted(marker)))
    with pytest.raises(CheckpointError, match=f"{checkpoint}.*--restart"):
        train(tmp_path / "run")
    assert not marker.exists()


def test_an_old_format_checkpoint_resumes_with_allow_pickle(whole, tmp_path):
    """The checkpoints older selfalign wrote (accelerate's save_state) still resume, when asked."""
    shutil.copytree(whole, tmp_path, dirs_exist_ok=True)
    checkpoint = kill_after_step_4(tmp_path)
    optimizer = json.loads((checkpoint / "optimizer.json").read_text())
    state = {int(i): dict(values) for i, values in optimizer["state"].items()}
    for key, tensor in load_file(str(checkpoint / "optimizer.safetensors")).items():
        index, name = key.split(".", 1)
        state[int(index)][name] = tensor
    python, numpy_state = json.loads((checkpoint / "rng-0.json").read_text()).values()
    torch.save({"state": state, "param_groups": optimizer["param_groups"]}, checkpoint / "optimizer.bin")
    torch.save(json.loads((checkpoint / "scheduler.json").read_text()), checkpoint / "custom_checkpoint_0.pkl")
    torch.save({"random_state": (python[0], tuple(python[1]), python[2]),
                "numpy_random_seed": (numpy_state[0], np.array(numpy_state[1], dtype=np.uint32), *numpy_state[2:]),
                "torch_manual_seed": load_file(str(checkpoint / "rng-0.safetensors"))["cpu"]},
               checkpoint / "random_states_0.pkl")
    (checkpoint / "adapter.safetensors").rename(checkpoint / "adapter_weights.safetensors")
    for name in ("optimizer.json", "optimizer.safetensors", "scheduler.json", "rng-0.json", "rng-0.safetensors"):
        (checkpoint / name).unlink()
    (checkpoint / "complete.json").write_text(json.dumps({"step": 4}) + "\n")

    with pytest.raises(CheckpointError):
        train(tmp_path)
    assert train(tmp_path, allow_pickle=True)["resumed_from"] == 4
    expected, found = adapter(whole), adapter(tmp_path)
    for name in expected:
        assert torch.equal(found[name], expected[name]), name


@pytest.mark.slow
def test_two_processes_resume_to_the_same_adapter(tmp_path):
    """Under `accelerate launch` the main process writes the checkpoint, each process its own random
    states, and every process loads them again."""
    responses = tmp_path / "responses.jsonl"
    responses.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"What is {i} plus {i}?",
                                             "answer": f"It is {2 * i}."}) + "\n" for i in range(10)))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no",
               "--dynamo_backend", "no", "-m", "selfalign", "stage", "engrave", "--run", "ddp", "--runs-dir",
               str(tmp_path), "--model", "tiny-random", "--responses", str(responses), "--epochs", "4",
               "--identity", "", "--checkpoint-every", "1", "--lora-dropout", "0.1"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    stage = tmp_path / "ddp" / "engrave"

    def launch() -> dict:
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(next(line for line in result.stdout.splitlines() if line.startswith("{")))["counts"]

    assert launch()["steps"] == 4
    assert sorted(p.name for p in (stage / "checkpoints" / "step-4").glob("rng-*")) == [
        "rng-0.json", "rng-0.safetensors", "rng-1.json", "rng-1.safetensors"]
    expected = adapter(stage)
    shutil.rmtree(stage / "adapter")
    shutil.rmtree(stage / "checkpoints" / "step-4")
    assert launch()["resumed_from"] == 3
    found = adapter(stage)
    for name in expected:
        assert torch.equal(found[name], expected[name]), name
