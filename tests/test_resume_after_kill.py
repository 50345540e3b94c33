"""A generation run killed with SIGKILL mid-way resumes and ends with every record exactly once."""

import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from conftest import kill_once_written


def stage_command(tmp_path, prompts_file):
    return [sys.executable, "-m", "selfalign", "stage", "baseline", "--run", "killed", "--runs-dir",
            str(tmp_path / "runs"), "--model", "tiny-random", "--prompts", str(prompts_file), "--limit", "0",
            "--batch-size", "1", "--max-new-tokens", "24", "--temperature", "1.0"]


@pytest.mark.slow  # a subprocess killed and rerun: 11-15 s, the longest of the quick tests before
def test_sigkill_then_rerun_gives_each_record_once(tmp_path):
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"id": f"p{i:03}", "prompt": f"question number {i} about the fox"}) + "\n"
                                    for i in range(80)))
    answers = tmp_path / "runs" / "killed" / "baseline" / "answers.jsonl"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    partial = kill_once_written(stage_command(tmp_path, prompts_file), answers, 5, env=env)
    assert 5 <= partial < 80
    manifest = json.loads((answers.parent / "manifest.json").read_text())
    assert manifest["status"] == "running"

    finished = subprocess.run(stage_command(tmp_path, prompts_file), env=env, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr[-2000:]
    ids = [json.loads(line)["id"] for line in answers.read_text().splitlines()]
    assert Counter(ids) == Counter(f"p{i:03}" for i in range(80))
    assert json.loads((answers.parent / "manifest.json").read_text())["status"] == "finished"
