"""One writer per stage: a second process is refused while the first holds the stage's lock, and a
killed holder (even by SIGKILL) leaves no lock behind. Real processes, since flock is per process."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest

from selfalign.cli import main
from selfalign.records import Run, RunError

REPO = Path(__file__).resolve().parents[1]

# Takes stage self_align of a run, writes records p0..p<n-1> (skipping those on disk), then holds the
# stage for `hold` seconds (0: finishes it). With "fork", a child process that outlives it is forked.
HOLDER = textwrap.dedent("""
    import os, sys, time
    from selfalign.records import Run
    run, runs_dir, n, hold, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
    stage = Run(run, runs_dir).stage("self_align")
    stage.start({"seed": 0}, restart=mode == "restart")
    with stage.writer("responses.jsonl", "drop/1") as writer:
        written = sum(writer.write({"id": f"p{i}", "reason": "r"}) for i in range(n))
    child = os.fork() if mode == "fork" else None
    if child == 0:
        time.sleep(hold)
        os._exit(0)
    print(f"holding {written}" + (f" child {child}" if child else ""), flush=True)
    time.sleep(hold)
    if not hold:
        stage.finish({"responses": n})
""")


@pytest.fixture
def holder_script(tmp_path):
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    return script


def hold(script, runs, n=3, seconds=120.0, mode="plain"):
    """A holder process, returned once it holds the stage, and the line it printed then."""
    process = subprocess.Popen([sys.executable, str(script), "r", str(runs), str(n), str(seconds), mode], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    assert line.startswith("holding"), f"the holder did not start: {line!r} {process.stderr.read()[-2000:]}"
    return process, line.split()


@contextmanager
def holding(script, runs, **options):
    """`hold`'s process for the length of a `with`, killed at its end whatever the test found."""
    holder, _ = hold(script, runs, **options)
    try:
        yield holder
    finally:
        holder.kill()
        holder.wait()


def attempt(script, runs, n=0, mode="plain"):
    return subprocess.run([sys.executable, str(script), "r", str(runs), str(n), "0", mode], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def ids(runs):
    path = runs / "r" / "self_align" / "responses.jsonl"
    return Counter(json.loads(line)["id"] for line in path.read_text().splitlines())


def test_a_second_process_is_refused_while_the_first_holds_the_stage(tmp_path, holder_script, capsys):
    runs = tmp_path / "runs"
    with holding(holder_script, runs) as holder:
        for mode in ("plain", "restart"):
            second = attempt(holder_script, runs, n=5, mode=mode)
            assert second.returncode != 0
            assert "RunError: run 'r': stage 'self_align' is being run by another process" in second.stderr
            assert f"pid {holder.pid} on " in second.stderr and f"kill {holder.pid}" in second.stderr
        # The command line says the same and exits 1, before loading a model; --restart deleted nothing.
        prompts = tmp_path / "prompts.jsonl"
        prompts.write_text('{"id": "p0", "prompt": "Name a colour."}\n')
        assert main(["stage", "self-align", "--run", "r", "--runs-dir", str(runs), "--model", "tiny-random",
                     "--prompts", str(prompts), "--min-responses", "0", "--restart"]) == 1
        error = capsys.readouterr().err
        assert "run 'r': stage 'self_align' is being run by another process" in error and f"pid {holder.pid}" in error
        assert ids(runs) == Counter({"p0": 1, "p1": 1, "p2": 1})
        assert not (runs / "r" / "self_align.previous").exists()
        assert holder.poll() is None


def test_a_holder_killed_by_sigkill_leaves_no_lock_and_the_stage_resumes(tmp_path, holder_script):
    runs = tmp_path / "runs"
    holder, _ = hold(holder_script, runs, n=3)
    lock = runs / "r" / ".self_align.lock"
    assert json.loads(lock.read_text())["pid"] == holder.pid
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert json.loads(lock.read_text())["pid"] == holder.pid  # what kill -9 leaves: a pid, but no lock

    resumed = attempt(holder_script, runs, n=6)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert resumed.stdout.strip() == "holding 3"  # p0-p2 were on disk; only p3-p5 were written
    assert ids(runs) == Counter({f"p{i}": 1 for i in range(6)})
    assert Run("r", runs).stage("self_align").finished
    assert lock.read_text() == ""  # finish released it


def test_deleting_the_lock_file_does_not_let_a_second_process_in(tmp_path, holder_script):
    runs = tmp_path / "runs"
    with holding(holder_script, runs) as holder:
        (runs / "r" / ".self_align.lock").unlink()  # what a user cleaning up "stale" files might do
        second = attempt(holder_script, runs, n=5)
        assert second.returncode != 0
        # The lock is on the stage's folder; the deleted file only named the holder.
        assert "stage 'self_align' is being run by another process (pid unknown)" in second.stderr
        assert ids(runs) == Counter({"p0": 1, "p1": 1, "p2": 1})
        assert holder.poll() is None


def test_a_restarted_stage_keeps_its_lock_on_the_new_folder(tmp_path, holder_script):
    runs = tmp_path / "runs"
    assert attempt(holder_script, runs, n=2).returncode == 0
    # The restart sets the locked folder aside as self_align.previous/ and works in a new one.
    with holding(holder_script, runs, mode="restart") as holder:
        second = attempt(holder_script, runs, n=5)
        assert second.returncode != 0 and f"pid {holder.pid}" in second.stderr
        assert ids(runs) == Counter({"p0": 1, "p1": 1, "p2": 1})


def test_finish_releases_the_lock_for_the_next_process(tmp_path, holder_script):
    runs = tmp_path / "runs"
    stage = Run("r", runs).stage("self_align")
    stage.start({"seed": 0})
    stage.start({"seed": 0})  # this process again (a notebook cell run twice): its own lock, not a refusal
    refused = attempt(holder_script, runs)
    assert refused.returncode != 0 and f"pid {os.getpid()}" in refused.stderr
    stage.finish({})
    taken = attempt(holder_script, runs)
    assert taken.returncode == 0, taken.stderr[-2000:]


def test_a_start_refused_for_other_settings_does_not_keep_the_lock(tmp_path, holder_script):
    runs = tmp_path / "runs"
    stage = Run("r", runs).stage("self_align")
    stage.start({"seed": 0})
    (stage.path / "answers.jsonl").write_text("{}\n")
    stage.finish({})
    with pytest.raises(RunError, match="other settings"):
        stage.start({"seed": 1})
    restarted = attempt(holder_script, runs, n=2, mode="restart")
    assert restarted.returncode == 0, restarted.stderr[-2000:]
    assert "restart: moved 1 records of self_align" in restarted.stderr


def test_a_forked_child_does_not_keep_a_killed_parents_lock(tmp_path, holder_script):
    runs = tmp_path / "runs"
    holder, line = hold(holder_script, runs, mode="fork")
    child = int(line[-1])
    try:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        os.kill(child, 0)  # the child (a DataLoader worker, say) still runs
        taken = attempt(holder_script, runs, n=3)
        assert taken.returncode == 0, taken.stderr[-2000:]
    finally:
        holder.kill()
        os.kill(child, signal.SIGKILL)


def test_training_refuses_records_that_repeat_an_id(tmp_path, tiny):
    from selfalign.stages.engrave import EngraveConfig
    from selfalign.chat_format import ChatFormat
    from selfalign.training import fit_and_compare

    stage = Run("r", tmp_path).stage("engrave")
    records = [{"id": f"r{i}", "prompt": f"What is {i}?", "answer": f"It is {i}."} for i in range(6)]
    records += [{**records[1], "answer": "A second text for r1."}, records[4]]
    with pytest.raises(ValueError, match="repeat the ids r1, r4"):
        fit_and_compare(stage, tiny, records, ChatFormat.load(), EngraveConfig(min_examples=1), set(), {})
    assert not (stage.path / "data.jsonl").exists()
