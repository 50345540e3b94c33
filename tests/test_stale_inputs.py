"""Reliability of resumes and starts (issue 19): a record answered from another prompt than its id
has now is refused, a command that fails before generating leaves nothing that blocks the
corrected one, counts out of range are refused by name, and a prompt too long for the context is
a drop with its id while the rest are answered."""

import dataclasses
import importlib.util
import json
import typing

import pytest
import yaml

from selfalign.cli import main
from selfalign.generation import Completion, Engine, PromptTooLongError, SamplingParams
from selfalign.models import ModelError
from selfalign.profiles import STAGES
from selfalign.inputs import PRINCIPLES_DIR, PromptFileError
from selfalign.records import Run, RunError
from selfalign.stages import baseline, engrave, evaluate, prompts as prompts_stage, self_align, verbose
from selfalign.training import TrainSettings
from conftest import REPO
from test_red_team import ScriptedBackend as RedTeamBackend
from test_red_team import config as red_team_config

ANSWER = " A plain question. I should follow rules 2 (Informative).\n\nWatson: Here is a plain answer to it.\n"


class Answering:
    """Answers every stage-2 prompt alike; counts about 8 characters a token."""

    name = "scripted"

    def __init__(self):
        self.prompts = []

    def count_tokens(self, texts, shared_prefix=None):
        return [len(t) // 8 for t in texts]

    def stream_batch(self, prompts, params, seeds, shared_prefix, max_prompt_tokens):
        self.prompts += prompts
        return [Completion(ANSWER, "stop", len(p) // 8, 20, "\nUser:") for p in prompts]


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def finished_stage_one(runs, texts):
    """A run whose stage 1 finished with these prompts, ids p0, p1, ... by position (as stage 1's are)."""
    stage = Run("r", runs).stage("prompts")
    stage.start({"seed": 0})
    write_jsonl(stage.path / "prompts.jsonl", [{"id": f"p{i}", "prompt": t, "source": "red_team"}
                                               for i, t in enumerate(texts)])
    stage.finish({})
    return stage.path / "prompts.jsonl"


def stage_two(runs, **overrides):
    backend = Answering()
    # The scripted answers have no model to score them by; scoring has its own tests.
    manifest = self_align.run(self_align.SelfAlignConfig(**{"run": "r", "runs_dir": str(runs),
                                                            "score_principles": False, "min_responses": 0,
                                                            **overrides}),
                              engine=Engine(backend, batch_size=2, progress=False))
    return manifest, backend


# 1. Stale answers --------------------------------------------------------------------------------

def test_stage_2_refuses_answers_to_prompts_a_stage_1_restart_renumbered(tmp_path):
    finished_stage_one(tmp_path, ["How do I bake bread?", "What is a prime number?", "Name a river."])
    manifest, _ = stage_two(tmp_path)
    assert manifest["counts"]["responses"] == 3
    calls = read(tmp_path / "r" / "self_align" / "calls.jsonl")
    assert all(len(c["input_sha256"]) == 64 for c in calls)
    # Stage 1 restarted: its positional ids now name other prompts.
    finished_stage_one(tmp_path, ["What is a prime number?", "How do I fix a bike?", "Name a river."])
    with pytest.raises(RunError) as refused:
        stage_two(tmp_path)
    message = str(refused.value)
    assert "stage 'self_align'" in message and "'p0', 'p1'" in message and "'p2'" not in message
    assert "--restart" in message and "new run name" in message
    # Refused before the stage started: it still says finished, with its old answers.
    assert Run("r", tmp_path).stage("self_align").finished
    assert read(tmp_path / "r" / "self_align" / "calls.jsonl") == calls
    manifest, backend = stage_two(tmp_path, restart=True)
    assert manifest["status"] == "finished" and len(backend.prompts) == 3
    answered = {c["id"]: c["prompt"] for c in read(tmp_path / "r" / "self_align" / "calls.jsonl")}
    assert answered == {"p0": "What is a prime number?", "p1": "How do I fix a bike?", "p2": "Name a river."}


def test_a_record_older_than_input_hashes_is_kept_only_while_its_prompt_is_unchanged(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(prompts, [{"id": "a", "prompt": "How do I bake bread?"}, {"id": "b", "prompt": "Name a river."}])
    stage_two(tmp_path, prompts=str(prompts))
    calls = tmp_path / "r" / "self_align" / "calls.jsonl"
    write_jsonl(calls, [{k: v for k, v in row.items() if k != "input_sha256"} for row in read(calls)])
    _, backend = stage_two(tmp_path, prompts=str(prompts))
    assert backend.prompts == []  # the same prompts: resumed, nothing asked again
    write_jsonl(prompts, [{"id": "a", "prompt": "How do I bake a cake?"}, {"id": "b", "prompt": "Name a river."}])
    with pytest.raises(RunError, match=r"\('a'; 1 in all\)"):
        stage_two(tmp_path, prompts=str(prompts))


def test_baseline_refuses_an_answer_whose_prompt_was_edited(tmp_path, shape):
    model, tiny = shape
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(prompts, [{"id": "a", "prompt": "one"}, {"id": "b", "prompt": "two"}])
    config = baseline.BaselineConfig(run="r", runs_dir=str(tmp_path), model=model, prompts=str(prompts),
                                     max_new_tokens=2)
    baseline.run(config, loaded=tiny)
    write_jsonl(prompts, [{"id": "a", "prompt": "one"}, {"id": "b", "prompt": "three"}])
    with pytest.raises(RunError, match=r"stage 'baseline'.*\('b'; 1 in all\).*--restart"):
        baseline.run(config, loaded=tiny)


def test_stage_1_refuses_calls_whose_request_changed_under_the_same_path(tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text((PRINCIPLES_DIR / "seed_prompts.jsonl").read_text())
    config = red_team_config(tmp_path, seeds=str(seeds))
    prompts_stage.run(config, engine=Engine(RedTeamBackend(), batch_size=4, progress=False))
    write_jsonl(seeds, [{**row, "prompt": row["prompt"] + " Be brief."} for row in read(seeds)])
    with pytest.raises(RunError, match=r"stage 'prompts'.*'si-0-0'"):
        prompts_stage.run(config, engine=Engine(RedTeamBackend(), batch_size=4, progress=False))


def test_stage_4_refuses_teacher_answers_to_changed_stage_3_prompts(tmp_path, shape):
    model, tiny = shape
    common = dict(run="r", runs_dir=str(tmp_path), model=model, epochs=1)
    engrave.run(engrave.EngraveConfig(**common, responses=str(REPO / "tests" / "data" / "responses.jsonl"),
                                      identity=""), loaded=tiny)
    config = verbose.VerboseConfig(**common, max_new_tokens=4, limit=3, train=False)
    verbose.run(config, loaded=tiny)
    calls = read(tmp_path / "r" / "verbose" / "calls.jsonl")
    assert len(calls) == 3 and all("input_sha256" in c for c in calls)
    data = tmp_path / "r" / "engrave" / "data.jsonl"
    rows = read(data)
    edited = next(row for row in rows if row["split"] != "dropped")
    write_jsonl(data, [{**row, "prompt": "Something else entirely?"} if row is edited else row for row in rows])
    with pytest.raises(RunError, match=rf"stage 'verbose'.*'{edited['id']}'.*--restart"):
        verbose.run(config, loaded=tiny)


def test_evaluation_refuses_vicuna_answers_to_a_changed_question(tmp_path, shape):
    model, tiny = shape
    data = tmp_path / "data"
    data.mkdir()
    questions = [{"question_id": 1, "category": "generic", "turns": ["How can I sleep better?"]},
                 {"question_id": 2, "category": "generic", "turns": ["What is a good breakfast?"]}]
    write_jsonl(data / "vicuna_questions.jsonl", questions)
    config = evaluate.EvaluateConfig(run="r", runs_dir=str(tmp_path), model=model, benchmarks=("vicuna",),
                                     limit=0, vicuna_limit=0, data_dir=str(data), max_new_tokens=2)
    evaluate.run(config, loaded=tiny)
    questions[1]["turns"] = ["What is a good dinner?"]
    write_jsonl(data / "vicuna_questions.jsonl", questions)
    with pytest.raises(RunError, match=r"stage 'evaluate'.*'base:2'"):
        evaluate.run(config, loaded=tiny)
    assert Run("r", tmp_path).stage("evaluate").finished


# 2. A failed start -------------------------------------------------------------------------------

def failing_starts(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(prompts, [{"id": "a", "prompt": "one"}])
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("not: [valid")
    runs = dict(run="r", runs_dir=str(tmp_path))
    return [
        (baseline, baseline.BaselineConfig(**runs, model="tiny-random", prompts=str(tmp_path / "missing.jsonl")),
         PromptFileError, "does not exist"),
        (baseline, baseline.BaselineConfig(**runs, model="no-such-model", prompts=str(prompts)), ModelError,
         "neither a registered model"),
        (baseline, baseline.BaselineConfig(**runs, model=str(tmp_path), prompts=str(prompts)), ModelError,
         "no config.json"),
        (self_align, self_align.SelfAlignConfig(**runs, model="tiny-random"), RunError, "no stage-1 prompts"),
        (self_align, self_align.SelfAlignConfig(**runs, model="tiny-random", prompts=str(prompts),
                                                principles=str(bad_yaml)), ValueError, "bad.yaml"),
        (prompts_stage, prompts_stage.PromptsConfig(**runs, model="tiny-random", templates=str(bad_yaml)), ValueError,
         "bad.yaml"),
        # vLLM absent (the project's venv): "needs vLLM"; present (make vllm): tiny-random is refused.
        (prompts_stage, prompts_stage.PromptsConfig(**runs, model="tiny-random", backend="vllm"),
         *((ModelError, "tiny-random lives in memory only; vLLM needs a model directory")
           if importlib.util.find_spec("vllm") else (ValueError, "needs vLLM"))),
        (evaluate, evaluate.EvaluateConfig(**runs, model="tiny-random", data_dir=str(tmp_path)), RunError,
         "benchmark data not found"),
        (engrave, engrave.EngraveConfig(**runs, model="no-such-model", responses=str(REPO / "tests" / "data" /
                                                                                   "responses.jsonl")),
         ModelError, "neither a registered model"),
        (verbose, verbose.VerboseConfig(**runs, model="tiny-random"), RunError, "no finished stage 3"),
    ]


def test_a_command_that_fails_before_generating_writes_no_manifest(tmp_path):
    for module, config, error, message in failing_starts(tmp_path):
        with pytest.raises(error, match=message):
            module.run(config)
        assert not list((tmp_path / "r").glob("*/manifest.json")), (module.__name__, message)


def test_the_corrected_command_runs_after_a_failed_start(tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(prompts, [{"id": "a", "prompt": "one"}, {"id": "b", "prompt": "two"}])
    common = ["stage", "baseline", "--run", "r", "--runs-dir", str(tmp_path), "--max-new-tokens", "2"]
    assert main([*common, "--model", "tiny-random", "--prompts", str(tmp_path / "missing.jsonl")]) == 1
    assert main([*common, "--model", "tiny-randon", "--prompts", str(prompts)]) == 1
    assert "'tiny-randon' is neither a registered model" in capsys.readouterr().err
    assert main([*common, "--model", "tiny-random", "--prompts", str(prompts)]) == 0
    assert Run("r", tmp_path).stage("baseline").manifest()["counts"]["answers"] == 2


def test_stage_2_waits_for_an_unfinished_stage_1(tmp_path):
    stage = Run("r", tmp_path).stage("prompts")
    stage.start({"seed": 0})
    write_jsonl(stage.path / "prompts.jsonl", [{"id": "p0", "prompt": "How do I bake bread?"}])
    with pytest.raises(RunError, match="stage 1 \\(prompts\\) of run 'r' is not finished"):
        stage_two(tmp_path)
    stage.finish({})
    assert stage_two(tmp_path)[0]["status"] == "finished"


# 3. Counts out of range --------------------------------------------------------------------------

@pytest.mark.parametrize("config_class, field, value, message", [
    (baseline.BaselineConfig, "limit", -3, "limit must be >= 0, got -3"),
    (self_align.SelfAlignConfig, "limit", -1, "limit must be >= 0, got -1"),
    (self_align.SelfAlignConfig, "batch_size", 0, "batch_size must be > 0, got 0"),
    (self_align.SelfAlignConfig, "top_p", 1.5, r"top_p must be in \(0, 1\], got 1.5"),
    (prompts_stage.PromptsConfig, "n_self_instruct", -1, "n_self_instruct must be >= 0"),
    (prompts_stage.PromptsConfig, "rouge_threshold", -0.5, r"rouge_threshold must be in \(0, 1\], got -0.5"),
    (engrave.EngraveConfig, "holdout", -0.1, r"holdout must be in \[0, 1\), got -0.1"),
    (engrave.EngraveConfig, "min_examples", -1, "min_examples must be >= 0"),
    (verbose.VerboseConfig, "limit", -1, "limit must be >= 0"),
    (verbose.VerboseConfig, "min_examples", -2, "min_examples must be >= 0"),
    (evaluate.EvaluateConfig, "vicuna_limit", -1, "vicuna_limit must be >= 0"),
    (baseline.BaselineConfig, "backend", "hf-fast", "backend must be one of hf, hf-static, vllm"),
])
def test_settings_out_of_range_are_refused_by_name(config_class, field, value, message):
    with pytest.raises(ValueError, match=message):
        config_class(**{field: value})


def test_every_count_size_and_rate_of_every_stage_refuses_a_negative_value():
    """A new numeric setting must be range-checked too (the LoRA ones are TrainSettings.check's)."""
    for name, (config_class, _) in STAGES.items():
        hints = typing.get_type_hints(config_class)
        for field in dataclasses.fields(config_class):
            if hints[field.name] not in (int, float) or field.name == "seed" or \
                    field.name in TrainSettings.__dataclass_fields__:
                continue
            with pytest.raises(ValueError, match=field.name):
                config_class(**{field.name: -1})


def test_zero_keeps_its_meaning():
    assert baseline.BaselineConfig(limit=0).limit == 0
    assert self_align.SelfAlignConfig(limit=0).limit == 0
    assert prompts_stage.PromptsConfig(types_limit=0, topics_shown=0).topics_shown == 0
    assert evaluate.EvaluateConfig(limit=0, vicuna_limit=0).vicuna_limit == 0
    assert engrave.EngraveConfig(holdout=0.0, min_examples=0).holdout == 0.0


def test_the_command_line_refuses_a_negative_limit(tmp_path, capsys):
    assert main(["stage", "baseline", "--run", "r", "--runs-dir", str(tmp_path), "--limit", "-3"]) == 1
    assert "limit must be >= 0, got -3" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


# 4. A prompt too long for the context ------------------------------------------------------------

def test_the_engine_says_which_prompts_are_too_long_and_names_a_refused_one_by_key():
    engine = Engine(Answering(), progress=False, context_length=100)
    params = SamplingParams(max_new_tokens=20)
    assert engine.too_long(["x" * 80, "x" * 800, "x" * 648, "x" * 640], params) == {1: 100, 2: 81}
    with pytest.raises(PromptTooLongError, match="prompt 'big' has 100 tokens"):
        engine.generate(["short", "x" * 800], params, keys=["small", "big"])
    with pytest.raises(PromptTooLongError, match="prompt 1 has 100 tokens"):
        engine.generate(["short", "x" * 800], params)
    assert Engine(Answering(), truncate="left", context_length=100).too_long(["x" * 800], params) == {}


def test_stage_2_drops_a_prompt_too_long_for_the_context_and_answers_the_rest(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(prompts, [{"id": "a", "prompt": "How do I bake bread?"}, {"id": "huge", "prompt": "word " * 10000},
                          {"id": "c", "prompt": "Name a river."}])
    with pytest.warns(UserWarning, match="1 prompts are too long.*'huge'"):
        manifest, backend = stage_two(tmp_path, prompts=str(prompts))
    out = tmp_path / "r" / "self_align"
    assert {r["id"] for r in read(out / "responses.jsonl")} == {"a", "c"}
    [drop] = read(out / "drops.jsonl")
    assert drop["id"] == "huge" and drop["reason"].startswith("prompt too long (")
    assert "context of 2048" in drop["reason"] and drop["prompt"] == ("word " * 10000).strip()
    assert manifest["counts"]["drop_reasons"] == {"prompt too long": 1}
    assert len(backend.prompts) == 2
    _, again = stage_two(tmp_path, prompts=str(prompts))  # a resume neither asks nor drops it again
    assert again.prompts == [] and len(read(out / "drops.jsonl")) == 1


def test_baseline_drops_a_50k_character_prompt_on_the_tiny_model(tmp_path, shape):
    model, tiny = shape
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(prompts, [{"id": "a", "prompt": "one"}, {"id": "long", "prompt": "the quick brown fox " * 2500},
                          {"id": "b", "prompt": "two"}])
    config = baseline.BaselineConfig(run="r", runs_dir=str(tmp_path), model=model, prompts=str(prompts),
                                     max_new_tokens=2)
    with pytest.warns(UserWarning, match="'long'"):
        manifest = baseline.run(config, loaded=tiny)
    out = tmp_path / "r" / "baseline"
    assert sorted(r["id"] for r in read(out / "answers.jsonl")) == ["a", "b"]
    assert [(d["id"], d["reason"].split(" (")[0]) for d in read(out / "drops.jsonl")] == [("long", "prompt too long")]
    assert manifest["counts"] == {"answers": 2, "prompts": 3, "drops": 1}


def test_stage_1_drops_a_request_too_long_for_the_context_and_goes_on(tmp_path):
    types = yaml.safe_load((PRINCIPLES_DIR / "red_team_types.yaml").read_text())
    first = types["types"][0]
    first["description"] = "very " * 3000  # its brainstorming request no longer fits
    path = tmp_path / "types.yaml"
    path.write_text(yaml.safe_dump(types))
    config = red_team_config(tmp_path, types=str(path), types_limit=2, max_rounds=2)
    with pytest.warns(UserWarning, match=f"'topics-{first['id']}-"):
        manifest = prompts_stage.run(config, engine=Engine(RedTeamBackend(), batch_size=4, progress=False))
    assert manifest["status"] == "finished" and manifest["counts"]["red_team"] > 0
    drops = {d["id"]: d["reason"] for d in read(tmp_path / "r" / "prompts" / "drops.jsonl")}
    assert drops[f"topics-{first['id']}-0"].startswith("prompt too long")
    assert drops[f"topics-{first['id']}-1"].startswith("prompt too long")
    assert first["id"] in " ".join(manifest["counts"]["shortfalls"])
    again = RedTeamBackend()
    prompts_stage.run(config, engine=Engine(again, batch_size=4, progress=False))
    assert again.batches == 0  # the resume rebuilt every call, dropped ones included, from disk
