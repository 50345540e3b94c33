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
    with pytest.raises(RunError, match="seed"):
        stage.start({"model": "m", "seed": 2})
    (stage.path / "out.jsonl").write_text("{}\n")
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
