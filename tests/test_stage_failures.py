"""A stage that keeps nothing, or fewer than the next stage needs, fails loudly: the command exits
non-zero with the drop reasons counted, the manifest says `failed` with a one-line `failure`, the
stage is not finished (the next one refuses it), its lock is released, and a rerun resumes it."""

import fcntl
import json
import os

import pytest

from selfalign.cli import main
from selfalign.generation import Completion, Engine
from selfalign.records import Run, StageFailed
from selfalign.stages import baseline, engrave, prompts as stage_one, self_align
from selfalign.stages.self_align import SelfAlignConfig


class LongBackend:
    """Counts every prompt as 10,000 tokens, so that each is too long for any context it is given;
    answers like stage 2's scripted model where asked (it never is, here)."""

    name = "scripted"

    def count_tokens(self, texts, shared_prefix=None):
        return [10_000 for _ in texts]

    def stream_batch(self, prompts, params, seeds, shared_prefix, max_prompt_tokens):
        return [Completion(" I should follow rules 2 (Informative).\nWatson: It is 42, the answer.\n", "stop", 9, 9)
                for _ in prompts]


def long_engine(*args, **kwargs):
    return Engine(LongBackend(), context_length=512, progress=False)


def manifest(runs, stage: str) -> dict:
    return json.loads((runs / "r" / stage / "manifest.json").read_text())


def lock_is_free(runs, stage: str) -> bool:
    """Whether another open of the stage's folder could lock it (flock is per open file)."""
    fd = os.open(Run("r", runs).stage(stage).path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"Question number {i}?"}) + "\n" for i in range(8)))
    return path


def test_stage_two_keeping_nothing_fails_with_its_drops_counted(tmp_path, prompts_file, monkeypatch, capsys):
    monkeypatch.setattr(self_align, "engine_for", long_engine)
    argv = ["stage", "self-align", "--run", "r", "--runs-dir", str(tmp_path), "--model", "tiny-random",
            "--prompts", str(prompts_file)]
    assert main(argv) == 1
    error = capsys.readouterr().err
    assert "kept 0 of 8 prompts" in error and "prompt too long 8" in error
    written = manifest(tmp_path, "self_align")
    assert written["status"] == "failed" and written["counts"]["drop_reasons"] == {"prompt too long": 8}
    assert written["failure"] == "kept 0 of 8 prompts, fewer than min_responses=5; drops: prompt too long 8"
    assert not Run("r", tmp_path).stage("self_align").finished and lock_is_free(tmp_path, "self_align")
    assert main(["status", "--run", "r", "--runs-dir", str(tmp_path)]) == 0  # the status shows why
    assert "self_align   failed    kept 0 of 8 prompts" in capsys.readouterr().out
    # Stage 3 refuses the failed stage by name.
    assert main(["stage", "engrave", "--run", "r", "--runs-dir", str(tmp_path), "--model", "tiny-random"]) == 1
    assert "stage 2 of run 'r' failed: kept 0 of 8 prompts" in capsys.readouterr().err
    # `selfalign run --direct` stops there the same way.
    assert main(["run", "--direct", "--run", "direct", "--runs-dir", str(tmp_path), "--model", "tiny-random",
                 "-p", "self-align.prompts", str(prompts_file), "--only", "self-align"]) == 1
    assert "stage 'self_align' failed: kept 0 of 8 prompts" in capsys.readouterr().err
    # A rerun that accepts none resumes the stage (min_responses changes no record, so no --restart).
    assert main([*argv, "--min-responses", "0"]) == 0
    rerun = manifest(tmp_path, "self_align")
    assert rerun["status"] == "finished" and "failure" not in rerun


def test_min_responses_zero_accepts_none_and_a_bound_in_between_fails(tmp_path, prompts_file):
    config = SelfAlignConfig(run="none", runs_dir=str(tmp_path), prompts=str(prompts_file), min_responses=0)
    assert self_align.run(config, engine=long_engine())["status"] == "finished"
    with pytest.raises(StageFailed, match="kept 0 of 3 prompts, fewer than min_responses=1"):
        self_align.run(SelfAlignConfig(run="some", runs_dir=str(tmp_path), prompts=str(prompts_file), limit=3,
                                       min_responses=1), engine=long_engine())


def test_stage_one_keeping_no_prompt_fails(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(stage_one, "engine_for", long_engine)
    argv = ["stage", "prompts", "--run", "r", "--runs-dir", str(tmp_path), "--model", "tiny-random",
            "--types-limit", "2", "--max-rounds", "1", "--n-self-instruct", "2", "--calls-per-round", "2"]
    assert main(argv) == 1
    error = capsys.readouterr().err
    # 2 Self-Instruct requests and a brainstorm for each of the 2 types, all too long: no topic, so no question.
    assert "kept no prompt after 0 model calls; drops: prompt too long 4" in error
    written = manifest(tmp_path, "prompts")
    assert written["status"] == "failed" and written["counts"]["drops"] == {"prompt too long": 4}
    assert lock_is_free(tmp_path, "prompts")
    # Stage 2 refuses a failed stage 1, naming why it failed.
    assert main(["stage", "self-align", "--run", "r", "--runs-dir", str(tmp_path), "--model", "tiny-random"]) == 1
    assert "stage 1 (prompts) of run 'r' failed: kept no prompt" in capsys.readouterr().err


def test_stage_three_with_too_few_examples_fails_after_it_started(tmp_path, capsys):
    responses = tmp_path / "responses.jsonl"
    responses.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"Question {i}?", "answer": f"Answer {i}.",
                                             "provenance": {}}) + "\n" for i in range(3)))
    argv = ["stage", "engrave", "--run", "r", "--runs-dir", str(tmp_path), "--model", "tiny-random",
            "--responses", str(responses), "--identity", ""]
    assert main(argv) == 1
    error = capsys.readouterr().err
    assert "kept 2 training examples of 3 records (1 held out), fewer than min_examples=4" in error
    written = manifest(tmp_path, "engrave")
    assert written["status"] == "failed" and written["counts"]["train"] == 2 and written["counts"]["holdout"] == 1
    assert "fewer than min_examples=4" in written["failure"] and lock_is_free(tmp_path, "engrave")
    assert not Run("r", tmp_path).stage("engrave").finished
    with pytest.raises(StageFailed):  # the same from Python
        engrave.run(engrave.EngraveConfig(run="r", runs_dir=str(tmp_path), model="tiny-random",
                                          responses=str(responses), identity=""))


def test_baseline_answering_nothing_fails(tmp_path, prompts_file, monkeypatch, capsys):
    monkeypatch.setattr(baseline, "engine_for", long_engine)
    assert main(["stage", "baseline", "--run", "r", "--runs-dir", str(tmp_path), "--model", "tiny-random",
                 "--prompts", str(prompts_file)]) == 1
    assert "answered 0 of 8 prompts; drops: prompt too long 8" in capsys.readouterr().err
    assert manifest(tmp_path, "baseline")["status"] == "failed" and lock_is_free(tmp_path, "baseline")


def thousand_principles(folder) -> str:
    """principles/principles.yaml with 1,000 principles: with the exemplars, far over tiny-random's
    context of 8,192 tokens."""
    import yaml

    from selfalign.inputs import PRINCIPLES_DIR

    words = ["Alpha", "Beta", "Gamma", "Delta", "Epsilon", "Zeta", "Eta", "Theta", "Iota", "Kappa"]
    principles = yaml.safe_load((PRINCIPLES_DIR / "principles.yaml").read_text())["principles"]
    principles += [{"number": 100 + i, "name": f"Care {words[i // 100]} {words[i // 10 % 10]} {words[i % 10]}",
                    "text": f"Principle {i}: be careful and precise in every answer."}
                   for i in range(1000 - len(principles))]
    path = folder / "principles-1000.yaml"
    path.write_text(yaml.safe_dump({"principles": principles}))
    return str(path)


# On tiny-random itself (8,192 positions): settings that leave room for new tokens but none for any
# prompt, so every prompt is dropped as too long. (A max_new_tokens of the whole context or more is
# refused before the stage starts: tests/test_settings_validation.py.)
NOTHING_FITS = {
    "stage-2-1000-principles": ("self_align", lambda folder: ["self-align", "--principles", thousand_principles(folder),
                                                               "--limit", "2", "--min-responses", "1"],
                                "prompt too long 2"),
    "stage-2-max-new-tokens": ("self_align", lambda folder: ["self-align", "--max-new-tokens", "8190", "--limit", "2",
                                                              "--min-responses", "1"], "prompt too long 2"),
    "baseline-max-new-tokens": ("baseline", lambda folder: ["baseline", "--max-new-tokens", "8190", "--limit", "2"],
                                "answered 0 of 2 prompts; drops: prompt too long 2"),
    "stage-1-max-new-tokens": ("prompts", lambda folder: [
        "prompts", "--list-max-new-tokens", "8190", "--topic-max-new-tokens", "8190", "--types-limit", "1",
        "--max-rounds", "1", "--n-self-instruct", "1", "--calls-per-round", "1"], "kept no prompt after 0 model calls"),
}


@pytest.mark.parametrize("case", NOTHING_FITS)
def test_a_stage_whose_every_prompt_is_too_long_exits_non_zero(case, tmp_path, prompts_file, capsys):
    stage, command, message = NOTHING_FITS[case]
    argv = ["stage", *command(tmp_path), "--run", "r", "--runs-dir", str(tmp_path), "--model", "tiny-random"]
    if stage != "prompts":
        argv += ["--prompts", str(prompts_file)]
    with pytest.warns(UserWarning, match="too long for the context"):
        assert main(argv) == 1
    assert message in capsys.readouterr().err
    written = manifest(tmp_path, stage)
    assert written["status"] == "failed" and message in written["failure"] and lock_is_free(tmp_path, stage)


def test_stage_two_with_fewer_prompts_than_it_must_keep_stops_before_the_model(tmp_path, prompts_file, capsys):
    # Two prompts can never give min_responses=5 answers: refused before loading a model or writing a file.
    argv = ["stage", "self-align", "--limit", "2", "--run", "r", "--runs-dir", str(tmp_path), "--model", "no-such-model",
            "--prompts", str(prompts_file)]
    assert main(argv) == 1
    assert "2 prompts to answer (limit 2), fewer than min_responses=5" in capsys.readouterr().err
    assert not (tmp_path / "r" / "self_align" / "manifest.json").exists()
