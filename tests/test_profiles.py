"""Profiles and the dry run: every stage's settings resolved from a profile and -p, shown without
running; the full profile is the paper's; the chapters run with exactly those settings."""

import ast
import dataclasses
import json

import papermill
import pytest

from conftest import REPO
from selfalign import cost, paper
from selfalign.book import CHAPTER_STAGES, notebooks, plan_book
from selfalign.cli import main
from selfalign.profiles import PROFILE_DIR, STAGES, ProfileError, load_profile, resolve
from selfalign.training.examples import split_holdout

# The paper's values (IBM/Dromedary's scripts, branch dromedary_v1), written out here apart from
# selfalign/paper.py, so that the full profile and the module's table are both checked against them.
PAPER = {
    "prompts": {"k_seeds": 5, "k_generated": 0, "temperature": 1.0, "list_top_p": 0.98, "question_top_p": 0.95,
                "topic_max_words": 3, "topics_shown": 5, "red_team_scheme": "mixed", "k_seed_questions": 5,
                "questions_per_request": 5, "rouge_sources": ["self_instruct"], "rouge_threshold": 0.7,
                "n_self_instruct": 267597, "list_max_new_tokens": 1024},
    "self-align": {"temperature": 0.5, "top_p": 0.95, "max_new_tokens": 256, "assistant": "Watson",
                   "suppress": ["Sorry"], "drop_apologies": True, "limit": 0, "constrain_format": False,
                   "max_answer_sentences": 0},
    "engrave": {"rank": 16, "lora_alpha": 16.0, "lora_dropout": 0.05,
                "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "learning_rate": 4e-4,
                "warmup_steps": 100, "epochs": 1, "cutoff": 512, "effective_batch_size": 768, "overlong": "truncate"},
    "verbose": {"temperature": 0.3, "top_p": 0.7, "max_new_tokens": 512, "cutoff": 768, "effective_batch_size": 768,
                "epochs": 1, "warmup_steps": 100},
}


def dry_run(capsys, *argv) -> dict:
    assert main(["run", "--dry-run", *argv]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("processes", [1, 8])
def test_full_profile_dry_run_is_the_paper(capsys, processes):
    shown = dry_run(capsys, "--direct", "--profile", "full", "--processes", str(processes))
    assert list(shown) == list(STAGES)
    for stage, values in PAPER.items():
        for name, value in values.items():
            assert shown[stage][name] == pytest.approx(value) if isinstance(value, float) else shown[stage][name] == value, \
                (stage, name, shown[stage][name], value)
    assert shown["engrave"]["processes"] == processes
    assert shown["engrave"]["accumulation_steps"] * shown["engrave"]["micro_batch_size"] * processes == 768
    # The module's own table agrees: under the full profile nothing differs from the paper.
    table = paper.difference_table(shown)
    assert not table["differs"].any(), table[table["differs"]]


def test_default_differences_are_explained_and_in_the_readme():
    table = paper.difference_table()
    differing = table[table["differs"]]
    assert len(differing) >= 10 and (differing["why"].str.len() > 0).all()
    assert set(table[~table["differs"]]["setting"]) >= {"rank", "learning_rate", "temperature"}
    readme = (REPO / "README.md").read_text()
    assert paper.markdown_differences() in readme, "regenerate the README's table: python -m selfalign.paper README.md"


def test_notebook_dry_run_shows_the_stages_the_chapters_run(capsys, tmp_path):
    shown = dry_run(capsys, "--runs-dir", str(tmp_path))
    assert list(shown) == ["prompts", "self-align", "engrave", "verbose", "evaluate"]  # no chapter runs the baseline
    assert shown["self-align"]["limit"] == 16 and shown["evaluate"]["limit"] == 10  # the tiny profile's
    only = dry_run(capsys, "--runs-dir", str(tmp_path), "--only", "02", "-p", "self-align.limit", "3")
    assert list(only) == ["self-align"] and only["self-align"]["limit"] == 3


def test_dry_run_loads_no_model_and_writes_nothing(capsys, tmp_path, monkeypatch):
    import selfalign.cli
    import selfalign.models

    def refuse(*args, **kwargs):
        raise AssertionError("a dry run loaded a model")

    monkeypatch.setattr(selfalign.models, "load_model", refuse)
    monkeypatch.setattr(selfalign.cli, "load_model", refuse)
    monkeypatch.chdir(tmp_path)
    dry_run(capsys, "--direct", "--profile", "full", "--runs-dir", str(tmp_path / "runs"))
    dry_run(capsys, "--profile", "full", "--runs-dir", str(tmp_path / "runs"))
    assert list(tmp_path.iterdir()) == []


def test_overrides_reach_every_stage_or_one(capsys):
    shown = dry_run(capsys, "--direct", "-p", "max_new_tokens", "7", "-p", "verbose.max_new_tokens", "9",
                    "-p", "seed", "3")
    assert shown["self-align"]["max_new_tokens"] == 7 and shown["baseline"]["max_new_tokens"] == 7
    assert shown["verbose"]["max_new_tokens"] == 9
    assert {values["seed"] for values in shown.values()} == {3}


@pytest.mark.parametrize("text, message", [
    ("engrave: {rnak: 8}\n", "stage 'engrave' has no settings \\['rnak'\\]"),
    ("all: {no_such_key: 1}\n", "no stage has the setting 'no_such_key'"),
    ("limit: 3\n", "unknown section 'limit' \\(a setting belongs under a stage"),
    ("self-align: [limit]\n", "section 'self-align' must be a mapping"),
    ("self-align: {limit: ten}\n", "setting 'limit' must be a whole number"),
    ("prompts: {rouge_sources: self_instruct}\n", "setting 'rouge_sources' must be a list"),
    ("self-align: {drop_apologies: 1}\n", "must be true or false"),
    ("all: {run: other}\n", "'run' is not a profile setting"),
])
def test_bad_profiles_are_refused_by_name(tmp_path, capsys, text, message):
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    assert main(["run", "--dry-run", "--direct", "--profile", str(path)]) == 1
    import re

    assert re.search(message, capsys.readouterr().err)


def test_bad_overrides_are_refused(capsys):
    assert main(["run", "--dry-run", "--direct", "-p", "no_such_setting", "1"]) == 1
    assert "no stage takes the parameters ['no_such_setting']" in capsys.readouterr().err
    assert main(["run", "--dry-run", "-p", "engrave.limit", "1"]) == 1
    assert "stage 'engrave' has no setting 'limit'" in capsys.readouterr().err
    assert main(["run", "--dry-run", "--direct", "-p", "engrave.total_batch_size", "10"]) == 1
    assert "not a multiple of micro_batch_size 4" in capsys.readouterr().err


def _declared(notebook) -> dict:
    return {name: info["default"] for name, info in papermill.inspect_notebook(str(notebook)).items()}


@pytest.mark.parametrize("notebook", [n for n in notebooks() if n.stem[:2] in CHAPTER_STAGES], ids=lambda n: n.stem)
def test_stage_chapters_pass_every_declared_setting_to_their_stage(notebook):
    """A chapter's parameter named like a stage setting must reach the stage, and so must `settings`,
    or the chapter would run with other settings than the dry run shows."""
    config_class = STAGES[CHAPTER_STAGES[notebook.stem[:2]]][0]
    fields = {f.name for f in dataclasses.fields(config_class)}
    declared = set(_declared(notebook))
    source = notebook.with_suffix(".py").read_text()
    calls = [node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Call)
             and getattr(node.func, "attr", getattr(node.func, "id", "")) == config_class.__name__]
    assert len(calls) == 1, f"{notebook.name} should build {config_class.__name__} once"
    passed = {k.arg: k.value for k in calls[0].keywords}
    assert "settings" in declared and passed.get(None) is not None and passed[None].id == "settings"
    for name in declared & fields:
        value = passed.get(name)
        assert isinstance(value, ast.Name) and value.id == name, f"{notebook.name}: {name} is not passed as {name}"


def test_chapter_defaults_are_the_stage_defaults():
    """A chapter's parameter cell repeats its stage dataclass's defaults, and the tiny profile
    (`make run`) changes none of them: a chapter opened by hand, `selfalign stage NAME` and
    `make run` run the same settings."""
    defaults = resolve({})
    assert resolve(load_profile("tiny")).stages == defaults.stages
    checked = 0
    for notebook in notebooks():
        stage = CHAPTER_STAGES.get(notebook.stem[:2])
        if not stage:
            continue
        config = defaults.stages[stage]
        fields = {f.name for f in dataclasses.fields(config)}
        for name, default in _declared(notebook).items():
            if name not in fields:
                continue  # a chapter's own parameter (`settings`, sample sizes), declared only there
            expected = getattr(config, name)
            expected = list(expected) if isinstance(expected, tuple) else expected
            actual = ast.literal_eval(default)
            assert actual == expected, (f"{notebook.name}: {name} = {actual!r}, but {type(config).__name__}.{name} "
                                        f"defaults to {expected!r}")
            checked += 1
    assert checked >= 20  # the five stage chapters declare their main settings


def test_chapters_get_the_full_profiles_settings(tmp_path):
    """Whatever a chapter does not declare reaches its stage through `settings`."""
    profile = load_profile("full")
    plan = dict(plan_book("r", tmp_path, profile, {})[0])
    resolved = resolve(profile, run="r", runs_dir=str(tmp_path.resolve()))
    for notebook, values in plan.items():
        stage = CHAPTER_STAGES.get(notebook.stem[:2])
        if not stage:
            continue
        config = resolved.stages[stage]
        fields = {f.name for f in dataclasses.fields(config)}
        rebuilt = {**dataclasses.asdict(type(config)()), **{k: v for k, v in values.items() if k in fields},
                   **values["settings"], "run": values["run"], "runs_dir": values["runs_dir"]}
        expected = json.loads(json.dumps(dataclasses.asdict(config)))
        assert json.loads(json.dumps(rebuilt)) == expected, notebook.name
    assert plan[next(n for n in plan if n.stem.startswith("06"))]["loo_prompts"] == 64  # a chapter parameter


@pytest.mark.parametrize("name", sorted(path.stem for path in PROFILE_DIR.glob("*.yaml")))
def test_stage_two_keeps_at_least_what_stage_three_needs(name):
    """A stage 2 that passes its min_responses gives stage 3 its min_examples after its holdout (the
    holdout's own rule, training.split_holdout), in every profile."""
    stages = resolve(load_profile(name)).stages
    kept, engraving = stages["self-align"].min_responses, stages["engrave"]
    held = split_holdout([f"r{i}" for i in range(kept)], engraving.holdout, engraving.seed)
    assert kept - len(held) >= engraving.min_examples, (name, kept, len(held), engraving.min_examples)


LAYOUT = {"backend", "tensor_parallel_size", "replicas", "repetition_penalty", "no_repeat_ngram_size",
          "score_principles"}  # what the companion of the full profile changes, and nothing else


def test_the_cluster_companion_is_the_full_run_on_gpu_nodes_with_its_cost(capsys):
    full, cluster = (resolve(load_profile(name)).stages for name in ("full", "full-cluster"))
    for stage in STAGES:
        changed = {k for k, v in dataclasses.asdict(full[stage]).items() if getattr(cluster[stage], k) != v}
        assert changed <= LAYOUT, (stage, changed)
    aligning = cluster["self-align"]
    assert (aligning.backend, aligning.tensor_parallel_size) == ("vllm", 8) and aligning.replicas > 1
    assert main(["run", "--dry-run", "--direct", "--profile", "full-cluster", "--processes", "32"]) == 0
    out, err = capsys.readouterr()
    assert not paper.difference_table(json.loads(out))["differs"].any()  # still the paper's method
    assert (f"backend vllm, {aligning.replicas} replicas x tensor_parallel_size 8 = {aligning.replicas * 8} GPUs "
            "generating, 32 training") in err
    rows = {line.strip(): line for line in err.splitlines()}
    for stage in [*(s.name for s in cost.paper_stages()), "total"]:
        (line,) = [line for line in rows if line.startswith(stage + " ")]
        gpu_hours, gpus, wall_hours = map(float, line.split()[-3:])
        assert gpu_hours > 0 and wall_hours == pytest.approx(gpu_hours / gpus, abs=0.1), line


def test_a_profile_extends_another_key_by_key(tmp_path):
    (tmp_path / "base.yaml").write_text("extends: full\nself-align: {limit: 7}\n")
    (tmp_path / "mine.yaml").write_text("extends: base.yaml\nall: {seed: 3}\nself-align: {max_new_tokens: 9}\n")
    mine = load_profile(str(tmp_path / "mine.yaml"))
    assert mine["self-align"]["limit"] == 7 and mine["self-align"]["max_new_tokens"] == 9
    assert mine["self-align"]["suppress"] == ["Sorry"] and mine["all"] == {"model": "/path/to/llama-65b", "seed": 3}
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ProfileError, match="comes back to itself"):
        load_profile(str(tmp_path / "loop.yaml"))
