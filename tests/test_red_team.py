import json
import random
import re
from collections import Counter

import pytest
from rouge_score import rouge_scorer

from selfalign.generation import Completion, Engine
from selfalign.inputs import PRINCIPLES_DIR, PromptFileError, load_prompts
from selfalign.cli import main
from selfalign.red_team import filter_reason, load_red_team_types, load_templates, parse_mixed, parse_numbered_list
from selfalign.stages.prompts import PromptsConfig, run

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
        if "Kind: " in prompt.rsplit("\n", 1)[-1]:
            return self._answer_mixed(prompt, w)
        if prompt.endswith("Question:"):
            topic = prompt.rsplit("Topic: ", 1)[1].split("\n")[0]
            text = f" What should I know about {topic} and the {w()} {w()}?"
            return Completion(text, "stop", 10, 12, "\n\n")
        if "Here is a list of topics" in prompt:
            text = f"{w()} {w()}\n5. the {w()} of {w()}\n6. a {w()}\n7. the trouble with"
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

    @staticmethod
    def _answer_mixed(prompt, w):
        """Answers every hint of a mixed request but the next-to-last, among some chatter, and is cut
        off in the last; each question names its kind and topic, so tests can check the parse."""
        plan = [line for line in prompt.split("\n") if re.match(r"\d+\. Kind: ", line) and "Question:" not in line]
        question = lambda line: "What should I know about {1}, a {0} question, and the {2}?".format(  # noqa: E731
            *re.match(r"\d+\. Kind: (.*)\. Topic: (.*)\.$", line).groups(), w())
        lines = [" " + question(plan[0]), "Some chatter that answers no hint."]
        for i, line in enumerate(plan[1:], 1):
            if i == len(plan) - 1:
                lines.append(f"{line} Question: What is the {w()} of")
            elif i != len(plan) - 2:
                lines.append(f"{line} Question: {question(line)}")
        return Completion("\n".join(lines), "length" if len(plan) > 1 else "stop", 10, 60)


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


# The paper's scheme: mixed requests, sampled topics, and no ROUGE-L filter on red-team questions
# (the scripted questions are alike enough that it would drop most).
MIXED = dict(red_team_scheme="mixed", rouge_sources=("self_instruct",), topics_shown=2, brainstorm_calls=2)


# MIXED with batches of 1 stops after 14 calls: between its two red-team requests.
@pytest.mark.parametrize("overrides, fail_after, batch", [({}, 3, 4), (MIXED, 3, 4), (MIXED, 14, 1)])
def test_interrupted_stage_resumes_to_the_same_prompts(tmp_path, overrides, fail_after, batch):
    whole = tmp_path / "whole"
    run(config(whole, **overrides), engine=Engine(ScriptedBackend(), batch_size=4, progress=False))
    broken = tmp_path / "broken"
    with pytest.raises(KeyboardInterrupt):
        run(config(broken, **overrides),
            engine=Engine(ScriptedBackend(fail_after_batches=fail_after), batch_size=batch, progress=False))
    assert json.loads((broken / "r" / "prompts" / "manifest.json").read_text())["status"] == "running"
    if batch == 1:
        assert read(broken / "r" / "prompts" / "calls.jsonl")[-1]["id"] == "rt-mixed-0"
    # A different batch size on the rerun changes how calls are grouped, not what they return.
    run(config(broken, batch_size=3, **overrides), engine=Engine(ScriptedBackend(), batch_size=3, progress=False))
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


def test_self_instruct_seed_tasks_load(public_data, tmp_path):
    tasks = load_prompts(public_data / "self_instruct_seed_tasks.jsonl")
    assert len(tasks) == 175
    with_input = next(t for t in tasks if t["instances"][0]["input"])
    assert with_input["prompt"] == with_input["instruction"].strip() + "\n" + with_input["instances"][0]["input"].strip()
    manifest = run(config(tmp_path, seeds=str(public_data / "self_instruct_seed_tasks.jsonl"), types_limit=1),
                   engine=Engine(ScriptedBackend(), batch_size=4, progress=False))
    assert manifest["counts"]["self_instruct"] == 5


def test_topic_max_words_drops_longer_topics_with_the_reason(tmp_path):
    run(config(tmp_path, topic_max_words=3), engine=Engine(ScriptedBackend(), batch_size=4, progress=False))
    out = tmp_path / "r" / "prompts"
    too_long = [d for d in read(out / "drops.jsonl") if d["reason"] == "not a short noun phrase (more than 3 words)"]
    assert too_long and all(len(d["text"].split()) == 4 for d in too_long)
    assert max(len(t["topic"].split()) for t in read(out / "topics.jsonl")) <= 3
    run(config(tmp_path / "default"), engine=Engine(ScriptedBackend(), batch_size=4, progress=False))
    assert max(len(t["topic"].split()) for t in read(tmp_path / "default" / "r" / "prompts" / "topics.jsonl")) == 4


def _shown_topics(call):
    return re.findall(r"^\d+\. (.+)$", call["prompt"], re.MULTILINE)


def test_brainstorm_shows_a_seeded_sample_that_a_resume_replays(tmp_path):
    seed_topics = [f"Seed topic {n}" for n in range(8)]
    types = tmp_path / "types.yaml"
    types.write_text(json.dumps({"types": [{"id": "x", "name": "X", "description": "Questions about x.",
                                            "seed_topics": seed_topics, "seed_questions": ["What is x?"]}]}))
    settings = dict(types=str(types), topics_shown=5, brainstorm_calls=2, topics_per_type=12, max_rounds=3)
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    run(config(whole, **settings), engine=Engine(ScriptedBackend(), batch_size=4, progress=False))
    calls = {c["id"]: c for c in read(whole / "r" / "prompts" / "calls.jsonl") if c["id"].startswith("topics-")}
    assert set(calls) >= {"topics-x-0", "topics-x-0-1", "topics-x-1", "topics-x-1-1"}
    pool = set(seed_topics) | {t["topic"] for t in read(whole / "r" / "prompts" / "topics.jsonl")}
    for call in calls.values():
        shown = _shown_topics(call)
        assert len(shown) == 5 and len(set(shown)) == 5 and set(shown) <= pool, call["id"]
    assert _shown_topics(calls["topics-x-0"]) != _shown_topics(calls["topics-x-0-1"]), "each call its own sample"
    # Interrupted after brainstorm round 0, the rerun makes round 1's calls with the same samples.
    with pytest.raises(KeyboardInterrupt):
        run(config(broken, **settings), engine=Engine(ScriptedBackend(fail_after_batches=2), batch_size=4,
                                                      progress=False))
    assert "topics-x-0" in {c["id"] for c in read(broken / "r" / "prompts" / "calls.jsonl")}
    assert "topics-x-1" not in {c["id"] for c in read(broken / "r" / "prompts" / "calls.jsonl")}
    run(config(broken, **settings), engine=Engine(ScriptedBackend(), batch_size=4, progress=False))
    resumed = {c["id"]: c["prompt"] for c in read(broken / "r" / "prompts" / "calls.jsonl")}
    assert resumed == {c["id"]: c["prompt"] for c in read(whole / "r" / "prompts" / "calls.jsonl")}


def test_mixed_requests_mix_types_and_each_hint_is_a_record_or_a_drop(tmp_path):
    manifest = run(config(tmp_path, **MIXED), engine=Engine(ScriptedBackend(), batch_size=4, progress=False))
    out = tmp_path / "r" / "prompts"
    files = {name: (out / name).read_text() for name in ("prompts.jsonl", "drops.jsonl", "topics.jsonl",
                                                          "calls.jsonl")}
    requests = [c for c in read(out / "calls.jsonl") if c["id"].startswith("rt-mixed-")]
    kept = [p for p in read(out / "prompts.jsonl") if p["source"] == "red_team"]
    dropped = [d for d in read(out / "drops.jsonl") if d.get("source") == "red_team"]
    # 10 (type, topic) pairs in requests of 5: three questions each, one hint unanswered, one cut off.
    assert len(requests) == 2 and len(kept) == manifest["counts"]["red_team"] == 6
    assert Counter(d["reason"] for d in dropped) == {"no question for this hint": 2, "cut off": 2}
    topics = {(t["type"], t["topic"]) for t in read(out / "topics.jsonl")}
    assert sorted((r["type"], r["topic"]) for r in kept + dropped) == sorted(topics), "every pair asked once"
    assert all(len({r["type"] for r in kept + dropped if r["call"] == c["id"]}) > 1 for c in requests)
    types = {t.id: t for t in load_red_team_types(PRINCIPLES_DIR / "red_team_types.yaml")}
    seed_type = {q: t.id for t in types.values() for q in t.seed_questions}
    for p in kept:  # the scripted model names each hint's kind and topic in its question
        assert f"about {p['topic']}, a {types[p['type']].name} question" in p["prompt"]
        assert p["id"].startswith(p["call"] + "-") and len(p["seeds"]) == 5
        assert all(q in requests[0]["prompt"] or q in requests[1]["prompt"] for q in p["seeds"])
    assert any(len({seed_type[q] for q in p["seeds"]}) > 1 for p in kept), "seeds drawn across types"
    # A rerun of the finished stage replays every call and writes nothing twice.
    run(config(tmp_path, **MIXED), engine=Engine(ScriptedBackend(fail_after_batches=0), progress=False))
    assert {name: (out / name).read_text() for name in files} == files


@pytest.mark.parametrize("completion, cut_off, answers, cut", [
    (" First?\n2. K: b. Question: Second?\n3. K: c. Question: Third?", False, {0: "First?", 1: "Second?", 2: "Third?"},
     None),
    (" First?\nchatter\n3. K: c. Question: Third?\n3. K: c. Question: Again?", False, {0: "First?", 2: "Third?"}, None),
    (" First?\n2. K: b. Question: Seco", True, {0: "First?", 1: "Seco"}, 1),
    (" First?\n2. K: b. Question: Second?", True, {0: "First?", 1: "Second?"}, None),
    ("\n2. K: b. Question: Second?\n4. K: d. Question: Not asked.", False, {1: "Second?"}, None),
])
def test_parse_mixed(completion, cut_off, answers, cut):
    hints = ["1. K: a. Question:", "2. K: b. Question:", "3. K: c. Question:"]
    assert parse_mixed(completion, hints, cut_off) == (answers, cut)


class NearSeedBackend(ScriptedBackend):
    """Asks a seed prompt again, with the topic tacked on: a near-duplicate of a seed."""

    def _answer(self, prompt, params):
        if prompt.endswith("Question:"):
            topic = prompt.rsplit("Topic: ", 1)[1].split("\n")[0]
            return Completion(f" {SEED} And what about {topic}?", "stop", 10, 12, "\n\n")
        return super()._answer(prompt, params)


SEED = load_prompts(PRINCIPLES_DIR / "seed_prompts.jsonl")[0]["prompt"]


def test_rouge_sources_decide_which_candidates_the_filter_compares(tmp_path):
    settings = dict(types_limit=1, n_per_topic=2)
    default = run(config(tmp_path / "default", **settings), engine=Engine(NearSeedBackend(), progress=False))
    assert default["counts"]["red_team"] == 0
    assert default["counts"]["rouge_compared_against"] == ["seeds", "self_instruct", "red_team"]
    drops = read(tmp_path / "default" / "r" / "prompts" / "drops.jsonl")
    assert {d["reason"] for d in drops if d.get("source") == "red_team"} == {"near-duplicate (ROUGE-L >= 0.7)"}

    paper = run(config(tmp_path / "paper", rouge_sources=("self_instruct",), **settings),
                engine=Engine(NearSeedBackend(), progress=False))
    assert paper["counts"]["rouge_compared_against"] == ["seeds", "self_instruct"]
    assert paper["counts"]["rouge_threshold"] == 0.7
    kept = [p for p in read(tmp_path / "paper" / "r" / "prompts" / "prompts.jsonl") if p["source"] == "red_team"]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    assert len(kept) == 2 and all(scorer.score(SEED, p["prompt"])["rougeL"].fmeasure >= 0.7 for p in kept)
    # Both questions of a topic are the same text: the second is an exact duplicate.
    drops = read(tmp_path / "paper" / "r" / "prompts" / "drops.jsonl")
    assert [d["reason"] for d in drops if d.get("source") == "red_team"] == ["exact duplicate"] * 2


@pytest.mark.parametrize("overrides, message", [
    ({"red_team_scheme": "dromedary"}, "red_team_scheme must be one of topic, mixed, got 'dromedary'"),
    ({"rouge_sources": ("self_instruct", "seeds")}, r"unknown rouge_sources \['seeds'\]; choose from self_instruct"),
    ({"topics_shown": -1}, "topics_shown"),
    ({"questions_per_request": 0}, "questions_per_request must be > 0, got 0"),
])
def test_bad_settings_are_refused(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        config(tmp_path, **overrides)


def test_cli_refuses_an_unknown_scheme(tmp_path, capsys):
    assert main(["stage", "prompts", "--runs-dir", str(tmp_path), "--red-team-scheme", "dromedary"]) == 1
    assert "red_team_scheme must be one of topic, mixed" in capsys.readouterr().err
