"""A run directory is ours: a symbolic link planted in it is refused, naming the link, before anything
is written, so nothing outside the runs directory is written, truncated or deleted through it.

Each case of the issue's battery is a planted link (`PLANTED`); the same outside folder is checked
byte for byte after every command."""

import json
import os
from pathlib import Path

import pytest

from selfalign.cli import main
from selfalign.locking import LockError, take_lock
from selfalign.links import LinkError
from selfalign.records import SCHEMAS, JsonlWriter, Run


def snapshot(folder: Path) -> dict:
    """Every file below `folder` (links not followed) with its bytes, and every folder."""
    found = {}
    for where, folders, files in os.walk(folder):
        for name in folders:
            found[os.path.relpath(os.path.join(where, name), folder)] = "folder"
        for name in files:
            found[os.path.relpath(os.path.join(where, name), folder)] = Path(where, name).read_bytes()
    return found


@pytest.fixture
def outside(tmp_path):
    """A folder outside the runs directory, holding what the links point at."""
    folder = tmp_path / "outside"
    (folder / "checkpoints" / "step-2").mkdir(parents=True)
    (folder / "checkpoints" / "step-2" / "complete.json").write_text('{"step": 2, "format": "safetensors+json"}\n')
    (folder / "checkpoints" / "step-1").mkdir()
    (folder / "checkpoints" / "step-1" / "complete.json").write_text('{"step": 1, "format": "safetensors+json"}\n')
    (folder / "stage").mkdir()
    (folder / "stage" / "notes.txt").write_text("mine\n")
    (folder / "records.jsonl").write_text('{"id": "x0", "reason": "r"}\n{"id": "x1", "rea')  # a "partial" last line
    (folder / "lock.txt").write_text("not a lock: a file of mine\n")
    return folder


def prompts_file(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"id": "p0", "prompt": "Name a colour."}\n')
    return path


def self_align(runs, tmp_path):
    return ["stage", "self-align", "--run", "r", "--runs-dir", str(runs), "--model", "tiny-random",
            "--prompts", str(prompts_file(tmp_path))]


# (what is planted, where in runs/r, what it points at, the command that must refuse it)
PLANTED = {
    "lock file": (".self_align.lock", "lock.txt", self_align),
    "record file": ("self_align/responses.jsonl", "records.jsonl", self_align),
    "checkpoints folder": ("engrave/checkpoints", "checkpoints",
                           lambda runs, tmp: ["stage", "engrave", "--run", "r", "--runs-dir", str(runs),
                                              "--model", "tiny-random"]),
    "stage folder": ("self_align", "stage", self_align),
    "book folder": ("book", "stage", lambda runs, tmp: ["book", "--run", "r", "--runs-dir", str(runs)]),
    "notebooks folder": ("notebooks", "stage", lambda runs, tmp: ["run", "--run", "r", "--runs-dir", str(runs),
                                                                 "--only", "01", "-p", "model", '"tiny-random"']),
    "run folder": ("", "stage", self_align),
}


@pytest.mark.parametrize("case", PLANTED)
def test_a_planted_link_is_refused_by_name_and_nothing_outside_changes(case, tmp_path, outside, capsys):
    where, target, command = PLANTED[case]
    runs = tmp_path / "runs"
    if where:  # a run that has run before, then a link planted in it
        Run("r", runs).stage("self_align")
    link = runs / "r" / where if where else runs / "r"
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_dir():
        link.rmdir()
    link.symlink_to(outside / target)
    before = snapshot(outside)

    assert main(command(runs, tmp_path)) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1, error
    assert error.startswith(f"selfalign: error: {link} is a symbolic link (to {outside / target})"), error
    assert snapshot(outside) == before
    assert link.is_symlink()  # refused, not removed: the user decides what it was


def test_a_link_planted_after_the_run_was_opened_is_refused_when_the_stage_starts(tmp_path, outside):
    # A notebook keeps its Run; `selfalign run --direct` runs one stage after another in one process.
    stage = Run("r", tmp_path / "runs").stage("engrave")
    (stage.path / "checkpoints").symlink_to(outside / "checkpoints")
    before = snapshot(outside)
    with pytest.raises(LinkError, match=r"engrave/checkpoints is a symbolic link"):
        stage.start({"seed": 0})
    assert stage.manifest() is None and snapshot(outside) == before


def test_a_linked_record_file_is_never_opened_for_writing(tmp_path, outside):
    # What closes the gap between the check and the open: the writer's own O_NOFOLLOW.
    (tmp_path / "responses.jsonl").symlink_to(outside / "records.jsonl")
    before = snapshot(outside)
    with pytest.raises(LinkError, match=r"responses.jsonl is a symbolic link"):
        JsonlWriter(tmp_path / "responses.jsonl", SCHEMAS["drop/1"])
    assert snapshot(outside) == before


def test_a_linked_holder_file_is_never_truncated_by_the_lock(tmp_path, outside):
    (tmp_path / "stage").mkdir()
    (tmp_path / ".stage.lock").symlink_to(outside / "lock.txt")
    before = snapshot(outside)
    with pytest.raises(LockError, match=r"\.stage\.lock: it is a symbolic link"):
        take_lock(tmp_path / "stage", tmp_path / ".stage.lock", "r", "stage")
    assert snapshot(outside) == before
    # ...and the lock it had taken on the folder was let go.
    (tmp_path / ".stage.lock").unlink()
    assert take_lock(tmp_path / "stage", tmp_path / ".stage.lock", "r", "stage")


def test_training_refuses_a_linked_checkpoints_folder_before_it_resumes_or_prunes(tmp_path, outside):
    from selfalign.training import TrainSettings, train_lora

    (tmp_path / "engrave").mkdir()
    (tmp_path / "engrave" / "checkpoints").symlink_to(outside / "checkpoints")
    before = snapshot(outside)
    with pytest.raises(LinkError, match=r"engrave/checkpoints is a symbolic link"):
        train_lora(None, [object()], TrainSettings(), tmp_path / "engrave")
    assert snapshot(outside) == before


def test_a_runs_directory_reached_through_a_link_is_the_users_choice(tmp_path):
    (tmp_path / "scratch").mkdir()
    (tmp_path / "runs").symlink_to(tmp_path / "scratch")
    stage = Run("r", tmp_path / "runs").stage("self_align")
    stage.start({"seed": 0})
    with stage.writer("responses.jsonl", "drop/1") as writer:
        writer.write({"id": "p0", "reason": "r"})
    stage.finish({})
    assert json.loads((tmp_path / "scratch" / "r" / "self_align" / "manifest.json").read_text())["status"] == "finished"
