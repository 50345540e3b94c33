import json
import os

import pytest

from selfalign.records import FORMAT_VERSION, Run, RunError, provenance, read_jsonl


def record(key, text="x"):
    return {"id": key, "prompt": "p", "completion": text, "finish_reason": "eos", "prompt_tokens": 1,
            "completion_tokens": 1, "provenance": provenance("m", {"temperature": 0.5}, seed=3)}


def test_records_are_appended_once_and_resumed(tmp_path):
    stage = Run("r1", tmp_path).stage("baseline")
    with stage.writer("answers.jsonl", "generation/1") as writer:
        assert writer.write(record("a")) and writer.write(record("b"))
        assert not writer.write(record("a", "again"))
    with stage.writer("answers.jsonl", "generation/1") as writer:
        assert "a" in writer and "c" not in writer
        writer.write(record("c"))
    rows = stage.read("answers.jsonl")
    assert [r["id"] for r in rows] == ["a", "b", "c"]
    assert rows[0]["completion"] == "x" and rows[0]["schema"] == "generation/1"


def test_a_partial_last_line_is_cut_before_appending(tmp_path):
    stage = Run("r1", tmp_path).stage("s")
    with stage.writer("out.jsonl", "generation/1") as writer:
        writer.write(record("a"))
    path = stage.path / "out.jsonl"
    with open(path, "a") as handle:
        handle.write('{"id": "b", "prompt": "hal')  # what a SIGKILL mid-write leaves
    assert [r["id"] for r in read_jsonl(path)] == ["a"]
    with stage.writer("out.jsonl", "generation/1") as writer:
        writer.write(record("b"))
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == ["a", "b"]


def test_schema_is_enforced(tmp_path):
    stage = Run("r1", tmp_path).stage("s")
    with stage.writer("out.jsonl", "generation/1") as writer:
        with pytest.raises(ValueError, match="lacks field 'completion'"):
            writer.write({k: v for k, v in record("a").items() if k != "completion"})
        with pytest.raises(ValueError, match="prompt_tokens"):
            writer.write({**record("a"), "prompt_tokens": "1"})


def test_manifest_lifecycle_and_changed_settings(tmp_path):
    stage = Run("r1", tmp_path).stage("s")
    stage.start({"model": "m", "seed": 1})
    assert not stage.finished
    stage.finish({"answers": 2})
    assert stage.finished and stage.manifest()["counts"] == {"answers": 2}
    stage.start({"model": "m", "seed": 1})  # resuming with the same settings is fine
    (stage.path / "out.jsonl").write_text("{}\n")
    with pytest.raises(RunError, match="seed.*--restart"):
        stage.start({"model": "m", "seed": 2})
    stage.start({"model": "m", "seed": 2}, restart=True)
    assert not (stage.path / "out.jsonl").exists()
    assert Run("r1", tmp_path).stages()["s"]["params"]["seed"] == 2


def test_incompatible_run_directory_is_refused(tmp_path):
    Run("old", tmp_path)
    marker = tmp_path / "old" / "run.json"
    marker.write_text(json.dumps({"format_version": FORMAT_VERSION + 1, "selfalign_version": "9.0"}))
    with pytest.raises(RunError, match="selfalign 9.0"):
        Run("old", tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_runs_dir_is_refused(tmp_path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(RunError, match="cannot create run directory"):
            Run("r", tmp_path / "sub")
    finally:
        tmp_path.chmod(0o700)


def test_runs_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(RunError, match="cannot create run directory"):
        Run("r", tmp_path / "file")


@pytest.mark.parametrize("name", ["", "../escape", "a/b", ".hidden"])
def test_bad_run_names(tmp_path, name):
    with pytest.raises(RunError, match="run name"):
        Run(name, tmp_path)


def test_restart_moves_the_stage_files_aside(tmp_path, capsys):
    run = Run("r1", tmp_path)
    stage = run.stage("s")
    stage.start({"seed": 1})
    with stage.writer("answers.jsonl", "generation/1") as writer:
        writer.write_all([record("a"), record("b"), record("c")])
    with stage.writer("drops.jsonl", "drop/1") as writer:
        writer.write({"id": "d", "reason": "too short"})
    (stage.path / "adapter").mkdir()
    (stage.path / "adapter" / "weights").write_text("w")
    stage.finish({"answers": 3})

    stage.start({"seed": 2}, restart=True)
    previous = tmp_path / "r1" / "s.previous"
    assert capsys.readouterr().err == (f"restart: moved 4 records of s (answers.jsonl 3, drops.jsonl 1) and adapter/ "
                                       f"to {previous}/\n")
    assert sorted(p.name for p in stage.path.iterdir()) == ["manifest.json"]
    assert [r["id"] for r in read_jsonl(previous / "answers.jsonl")] == ["a", "b", "c"]
    assert (previous / "adapter" / "weights").read_text() == "w"
    assert json.loads((previous / "manifest.json").read_text())["params"] == {"seed": 1}
    assert list(run.stages()) == ["s"] and run.stages()["s"]["params"] == {"seed": 2}

    with stage.writer("answers.jsonl", "generation/1") as writer:
        writer.write(record("z"))
    stage.start({"seed": 3}, restart=True)  # replaces the older set-aside files
    assert "moved 1 records of s (answers.jsonl 1)" in capsys.readouterr().err
    assert [r["id"] for r in read_jsonl(previous / "answers.jsonl")] == ["z"]
    assert not (previous / "adapter").exists()


def test_restart_of_an_empty_stage_moves_nothing(tmp_path, capsys):
    stage = Run("r1", tmp_path).stage("s")
    stage.start({"seed": 1}, restart=True)
    assert capsys.readouterr().err == "" and not (tmp_path / "r1" / "s.previous").exists()


# Every command that takes a run name, each with options that would let it get far if the name passed.
RUN_COMMANDS = {
    "run": ["run"],
    "run --direct": ["run", "--direct", "--only", "baseline", "--model", "tiny-random"],
    "book": ["book"],
    "status": ["status"],
    "chat": ["chat", "--model", "tiny-random"],
    "stage baseline": ["stage", "baseline", "--model", "tiny-random", "--limit", "1"],
}


@pytest.mark.parametrize("name", ["..", "a/../../b", "ABSOLUTE", ""])
@pytest.mark.parametrize("command", list(RUN_COMMANDS))
def test_every_command_refuses_a_run_name_outside_the_runs_dir(tmp_path, monkeypatch, capsys, command, name):
    from selfalign.cli import main

    runs = tmp_path / "top" / "runs"
    runs.mkdir(parents=True)
    name = str(tmp_path / "outside") if name == "ABSOLUTE" else name
    monkeypatch.chdir(tmp_path)
    assert main([*RUN_COMMANDS[command], "--run", name, "--runs-dir", str(runs)]) == 1
    assert f"run name {name!r}" in capsys.readouterr().err
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["top", "top/runs"]


def test_a_start_that_produced_nothing_does_not_hold_the_run_to_its_settings(tmp_path):
    """A command that failed after its manifest was written (a model that would not load) must
    not make the corrected command fail with "started with other settings"."""
    stage = Run("r1", tmp_path).stage("s")
    stage.start({"model": "typo"})
    stage.start({"model": "m"})
    assert stage.manifest()["params"] == {"model": "m"}
    (stage.path / "out.jsonl").write_text("{}\n")
    with pytest.raises(RunError, match="other settings \\(model\\)"):
        stage.start({"model": "other"})
