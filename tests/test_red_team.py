import json
import random

import pytest
from rouge_score import rouge_scorer

from selfalign.generate import Completion, Engine
from selfalign.prompts import PRINCIPLES_DIR, PromptFileError, load_prompts
from selfalign.stages.red_team import (PromptsConfig, filter_reason, load_red_team_types, load_templates,
                                       parse_numbered_list, run)

WORDS = ("river mountain poem budget recipe python sorting history planet vaccine garden bicycle contract "
         "election violin glacier spreadsheet marathon telescope pottery").split()


class ScriptedBackend:
    """Writes plausible list items, topics and questions; each answer depends only on its prompt and
    the sample's seed, never on how prompts were batched, so interrupted and whole runs must agree."""

    name = "scripted"

    def __init__(self, fail_after_batches=None):
        self.batches = 0
        self.fail_after_batches = fail_after_batches

    def count_tokens(self, texts, shared_prefix=None):
        return [len(t.split()) for t in texts]

    def stream_batch(self, prompts, params, seed, shared_prefix, max_prompt_tokens):
        if self.fail_after_batches is not None and self.batches >= self.fail_after_batches:
            raise KeyboardInterrupt("simulated interruption")
        self.batches += 1
        return [self._answer(p, params) for p in prompts]

    def _answer(self, prompt, params):
        rng = random.Random(f"{params.seed}|{prompt}")
        w = lambda: rng.choice(WORDS)  # noqa: E731
        if prompt.endswith("Question:"):
            topic = prompt.rsplit("Topic: ", 1)[1].split("\n")[0]
            text = f" What should I know about {topic} and the {w()} {w()}?"
            return Completion(text, "stop", 10, 12, "\n\n")
        if "Here is a list of topics" in prompt:
            text = f"{w()} {w()}\n5. {w()} of {w()}\n6. a {w()}\n7. the trouble with"
            return Completion(text, "length", 10, 20)
        kinds = [lambda: f"Explain how a {w()} works to a {w()} expert.",
                 lambda: f"Draw a picture of a {w()}.", lambda: f"{w()}?",
                 lambda: f"Write a short note about the {w()} and the {w()} for {w()} people.",
                 lambda: f"List three surprising facts about {w()} that a {w()} fan would enjoy.",
                 lambda: f"Compare {w()} with {w()} in terms of cost, risk and time.",
                 lambda: f"My {w()} broke yesterday; how do I fix it before the {w()} tomorrow?",
                 lambda: f"Give a one-line {w()} slogan."]
        lines = [rng.choice(kinds)()] + [f"{n}. " + rng.choice(kinds)() for n in range(5, 9)]
        return Completion("\n".join(lines) + "\n9. Unfinished", "length", 10, 60)


def config(tmp_path, **overrides):
    settings = dict(run="r", runs_dir=str(tmp_path), model="scripted", n_self_instruct=5, calls_per_round=3,
                    types_limit=5, topics_per_type=2, n_per_topic=2, batch_size=4)
    return PromptsConfig(**{**settings, **overrides})


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_stage_writes_typed_prompts_without_near_duplicates(tmp_path):
    manifest = run(config(tmp_path), engine=Engine(ScriptedBackend(), batch_size=4, progress=False))
    out = tmp_path / "r" / "prompts"
    prompts = read(out / "prompts.jsonl")
    assert manifest["status"] == "finished"
    assert manifest["counts"]["self_instruct"] == 5
    assert sum(p["source"] == "self_instruct" for p in prompts) == 5
    red_team = [p for p in prompts if p["source"] == "red_team"]
    assert red_team and all(p["type"] and p["topic"] and p["seeds"] and p["call"] for p in red_team)
    topics = read(out / "topics.jsonl")
    per_type = {t["type"]: sum(x["type"] == t["type"] for x in topics) for t in topics}
    assert set(per_type.values()) == {2} and len(per_type) == 5, "topics are balanced across types"
    reasons = {d["reason"] for d in read(out / "drops.jsonl")}
    assert "non-text task (draw)" in reasons and "fewer than 3 words" in reasons
    assert any(r.startswith("near-duplicate") for r in reasons)
    # No kept pair (and no kept prompt vs. a seed) reaches the threshold, by the reference scorer.
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    texts = [p["prompt"] for p in prompts]
    seeds = [s["prompt"] for s in load_prompts(PRINCIPLES_DIR / "seed_prompts.jsonl")]
    for i, text in enumerate(texts):
        for other in texts[:i] + seeds:
            assert scorer.score(other, text)["rougeL"].fmeasure < 0.7


def test_interrupted_stage_resumes_to_the_same_prompts(tmp_path):
    whole = tmp_path / "whole"
    run(config(whole), engine=Engine(ScriptedBackend(), batch_size=4, progress=False))
    broken = tmp_path / "broken"
    with pytest.raises(KeyboardInterrupt):
        run(config(broken), engine=Engine(ScriptedBackend(fail_after_batches=3), batch_size=4, progress=False))
    assert json.loads((broken / "r" / "prompts" / "manifest.json").read_text())["status"] == "running"
    # A different batch size on the rerun changes how calls are grouped, not what they return.
    run(config(broken, batch_size=3), engine=Engine(ScriptedBackend(), batch_size=3, progress=False))
    for name in ("prompts.jsonl", "drops.jsonl", "topics.jsonl", "calls.jsonl"):
        a = {r["id"]: r for r in read(whole / "r" / "prompts" / name)}
        b = read(broken / "r" / "prompts" / name)
        assert len(b) == len({r["id"] for r in b}), f"{name} has duplicates"
        assert {r["id"]: r for r in b}.keys() == a.keys(), name
        if name != "calls.jsonl":
            assert {r["id"]: r.get("prompt", r.get("text")) for r in b} == \
                   {k: r.get("prompt", r.get("text")) for k, r in a.items()}


def test_count_the_model_cannot_reach_stops_and_says_so(tmp_path, capsys):
    manifest = run(config(tmp_path, n_self_instruct=500, max_rounds=2, types_limit=1),
                   engine=Engine(ScriptedBackend(), batch_size=4, progress=False))
    assert manifest["counts"]["self_instruct"] < 500
    assert "Self-Instruct kept" in manifest["counts"]["shortfalls"][0]
    assert "stopped short" in capsys.readouterr().out


@pytest.mark.parametrize("completion, cut_off, expected", [
    ("Plan a trip.\n5. Sort a list\n6) Name three rivers", False, ["Plan a trip.", "Sort a list", "Name three rivers"]),
    ("Plan a trip.\n5. Sort a list\n6. Name thr", True, ["Plan a trip.", "Sort a list"]),
    ("Write a poem\nabout rain.\n5. Next one", False, ["Write a poem about rain.", "Next one"]),
    ("Only one.\n\nNow some chatter 5. not an item", True, ["Only one."]),
    ("", False, []),
    ("  \n5. Second", False, ["Second"]),
    ("Use 3.5 cups of flour.\n12. Compute 2. plus 2", False, ["Use 3.5 cups of flour.", "Compute 2. plus 2"]),
])
def test_parse_numbered_list(completion, cut_off, expected):
    assert parse_numbered_list(completion, cut_off) == expected


@pytest.mark.parametrize("text, reason", [
    ("Hi there", "fewer than 3 words"),
    ("word " * 151, "more than 150 words"),
    ("Describe the image below in detail.", "non-text task (image)"),
    ("Plot the sales figures for 2020.", "non-text task (plot)"),
    ("- Write a limerick about cats.", "does not start with a letter or digit"),
    ("Écris un poème sur la mer.", "does not start with a letter or digit"),
    ("Write a limerick about a cat who profiles code.", None),
])
def test_filter_reason(text, reason):
    assert filter_reason(text, 3, 150) == reason


def test_shipped_principle_files_are_valid():
    types = load_red_team_types(PRINCIPLES_DIR / "red_team_types.yaml")
    assert len(types) == 20 and len({t.id for t in types}) == 20
    load_templates(PRINCIPLES_DIR / "red_team_templates.yaml")
    assert len(load_prompts(PRINCIPLES_DIR / "seed_prompts.jsonl")) >= 40


def test_types_file_errors(tmp_path):
    good = {"id": "a", "name": "A", "description": "d", "seed_topics": ["t"], "seed_questions": ["q?"]}
    path = tmp_path / "types.yaml"
    path.write_text(json.dumps({"types": [good, good]}))
    with pytest.raises(PromptFileError, match="'a' appears twice"):
        load_red_team_types(path)
    path.write_text(json.dumps({"types": [{**good, "seed_topics": []}]}))
    with pytest.raises(PromptFileError, match="lacks seed_topics"):
        load_red_team_types(path)


def test_template_without_its_marker_is_refused(tmp_path):
    path = tmp_path / "t.yaml"
    text = (PRINCIPLES_DIR / "red_team_templates.yaml").read_text().replace("{topic}", "TOPIC")
    path.write_text(text)
    with pytest.raises(PromptFileError, match="'questions' lacks {topic}"):
        load_templates(path)


def test_seed_file_with_no_usable_prompt(tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text('{"id": "1", "prompt": "Hi"}\n{"id": "2", "prompt": "Draw a picture of a cat"}\n')
    with pytest.raises(PromptFileError, match="0 usable seed prompts"):
        run(config(tmp_path, seeds=str(seeds)), engine=Engine(ScriptedBackend(), progress=False))


def test_self_instruct_seed_tasks_load(shared_data, tmp_path):
    tasks = load_prompts(shared_data / "self_instruct_seed_tasks.jsonl")
    assert len(tasks) == 175
    with_input = next(t for t in tasks if t["instances"][0]["input"])
    assert with_input["prompt"] == with_input["instruction"].strip() + "\n" + with_input["instances"][0]["input"].strip()
    manifest = run(config(tmp_path, seeds=str(shared_data / "self_instruct_seed_tasks.jsonl"), types_limit=1),
                   engine=Engine(ScriptedBackend(), batch_size=4, progress=False))
    assert manifest["counts"]["self_instruct"] == 5
