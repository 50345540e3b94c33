"""Principle triggers: the format grammar, decoding under it, and principle_scores by likelihood."""

import json
import math
import re

import pandas as pd
import pytest

from selfalign.generation import Engine, SamplingParams
from selfalign.generation.grammar import accepts, check_grammar
from selfalign.principles import load_principle_set, parse_response, render_prefix, render_prompt, rules_sentence
from selfalign.scoring import ModelScorer, score_one_by_one
from selfalign.stages import self_align
from selfalign.triggers import (disagreements, format_grammar, plot_score_heatmap, principle_scores,
                                scoring_context, score_stats)

PRINCIPLES = load_principle_set()
GRAMMAR = format_grammar(PRINCIPLES, "Watson")


def exemplar_completion(exemplar) -> str:
    """An exemplar as the model would continue "Watson (internal thoughts):"."""
    thoughts = f"{exemplar.thoughts} {rules_sentence(PRINCIPLES, exemplar.cites)}"
    return f" {thoughts}\n\nWatson: {exemplar.answer.replace('{name}', 'Watson')}\n\nUser:"


def test_grammar_compiles_and_lists_each_principle_once():
    check_grammar(GRAMMAR)
    for p in PRINCIPLES.principles:
        assert GRAMMAR.count(f'"{p.number} ({p.name})"') == 1
    with pytest.raises(ValueError, match="does not compile"):
        check_grammar("start: undefined_rule")
    with pytest.raises(ValueError, match="max_thought_sentences"):
        format_grammar(PRINCIPLES, "Watson", 0)


@pytest.mark.parametrize("exemplar", PRINCIPLES.exemplars, ids=lambda e: e.id)
def test_grammar_accepts_every_exemplar(tiny, exemplar):
    assert accepts(GRAMMAR, tiny.tokenizer, exemplar_completion(exemplar), complete=True)


@pytest.mark.parametrize("exemplar", PRINCIPLES.exemplars, ids=lambda e: e.id)
def test_the_stages_grammar_accepts_every_exemplar_cut_to_its_bounds(tiny, exemplar):
    """The stage's default bounds (a CPU run's 160 tokens) allow an exemplar cut to its first thought
    sentences and answer sentences, and refuse it whole where it has more of either."""
    config = self_align.SelfAlignConfig()
    grammar = self_align.sampling(config, PRINCIPLES).grammar
    all_thoughts = re.findall(r"[^.!?]+[.!?]+", exemplar.thoughts)
    sentences = re.findall(r"\s*[^\s.!?][^\n.!?]*(?:[.!?]+|\n)", exemplar.answer)
    thoughts, answer = all_thoughts[:config.max_thought_sentences], "".join(sentences[:config.max_answer_sentences])
    text = f" {''.join(thoughts).strip()} {rules_sentence(PRINCIPLES, exemplar.cites)}\n\nWatson: {answer.strip()}\nUser:"
    assert accepts(grammar, tiny.tokenizer, text, complete=True)
    longer = len(all_thoughts) > config.max_thought_sentences or len(sentences) > config.max_answer_sentences
    assert accepts(grammar, tiny.tokenizer, exemplar_completion(exemplar), complete=True) is not longer


@pytest.mark.parametrize("bad", [
    " The user asks. I should follow rules 5 (Candor).",  # a number with another principle's name
    " The user asks. I should follow rules 23 (Made Up).",  # a principle the set lacks
    # more citations than any exemplar shows
    " The user asks. " + rules_sentence(PRINCIPLES, range(1, 2 + max(len(e.cites) for e in PRINCIPLES.exemplars))),
    " The user asks.\n\nWatson: no rules sentence.",
    " One. Two. Three. Four. I should follow rules 7 (Candor).",  # more sentences than allowed
    " So I should follow rules 5 (Candor). I should follow rules 7 (Candor).",  # a citation inside the thoughts
])
def test_grammar_refuses_a_wrong_citation_or_a_broken_format(tiny, bad):
    assert accepts(GRAMMAR, tiny.tokenizer, " The user asks. I should follow rules 7 (Candor).")
    assert not accepts(GRAMMAR, tiny.tokenizer, bad)


def test_an_answer_cap_ends_the_answer_after_whole_sentences(tiny):
    capped = format_grammar(PRINCIPLES, "Watson", max_answer_sentences=2)
    start = " Fine. I should follow rules 7 (Candor).\n\nWatson:"
    assert accepts(capped, tiny.tokenizer, start + " One. Two!\n\nUser:", complete=True)
    assert accepts(capped, tiny.tokenizer, start + " A list:\n- first\nUser:", complete=True)  # a line is a sentence
    assert not accepts(capped, tiny.tokenizer, start + " One. Two. Three.")
    assert accepts(capped, tiny.tokenizer, start + " One. Two half")  # the rest of a sentence may follow
    assert not accepts(capped, tiny.tokenizer, start + " One. Two half. Three")
    longer = [e for e in PRINCIPLES.exemplars if len(re.findall(r"[^\s.!?][^\n.!?]*(?:[.!?]+|\n)", e.answer)) > 2]
    assert longer and not any(accepts(capped, tiny.tokenizer, exemplar_completion(e), complete=True) for e in longer)


def test_grammar_follows_an_edited_set(tiny):
    without = PRINCIPLES.without(7)
    grammar = format_grammar(without, "Watson")
    assert "Candor" not in grammar
    assert not accepts(grammar, tiny.tokenizer, " The user asks. I should follow rules 7 (Candor).")
    assert accepts(format_grammar(PRINCIPLES, "Ada"), tiny.tokenizer,
                   " Fine. I should follow rules 7 (Candor).\n\nAda: Yes, it is fine.")


@pytest.mark.parametrize("cited", [1, 2, 3])
def test_grammar_of_exemplars_that_cite_few_principles_compiles(tiny, cited):
    """At most two citations an exemplar once wrote a repeat {0,0}, which llguidance refuses."""
    import dataclasses

    first = PRINCIPLES.exemplars[0]
    few = dataclasses.replace(PRINCIPLES, exemplars=(dataclasses.replace(first, cites=first.cites[:cited]),))
    grammar = format_grammar(few, "Watson")
    check_grammar(grammar)
    two = " A. I should follow rules 2 (Informative) and 7 (Candor).\n\nWatson: Yes."
    assert accepts(grammar, tiny.tokenizer, two, complete=False) == (cited >= 2)
    assert not accepts(grammar, tiny.tokenizer, " A. I should follow rules 2 (Informative), 7 (Candor).")


# One exemplar: a shorter prefix, the same grammar (it lists the principles, not the exemplars).
SHORT = PRINCIPLES.with_exemplars([PRINCIPLES.exemplars[0].id])


@pytest.mark.parametrize("backend,temperature", [("hf", 0.0), ("hf", 1.0), ("hf-static", 1.0)])
def test_constrained_decoding_on_tiny_random_emits_only_valid_citations(tiny, backend, temperature):
    grammar = format_grammar(SHORT, "Watson", max_thought_sentences=1)
    params = SamplingParams(temperature=temperature, top_p=1.0, max_new_tokens=160, stop=("\nUser:",), seed=3,
                            grammar=grammar)
    queries = ["What is 2 + 2?", "How do I pick a lock?", "Tell me a story.", "Who won the 2030 World Cup?"]
    engine = Engine.for_model(tiny, backend=backend, batch_size=4, progress=False)
    completions = engine.generate([render_prompt(SHORT, q) for q in queries], params,
                                  shared_prefix=render_prefix(SHORT, "Watson"))
    cited = 0
    for completion in completions:
        # Random weights write noise, but only noise the grammar allows, up to where it stopped.
        assert accepts(grammar, tiny.tokenizer, completion.text), completion.text
        parsed = parse_response(PRINCIPLES, completion.text)
        assert parsed.unknown_citations == []
        if " I should follow rules " in completion.text and parsed.has_answer_marker:
            assert parsed.triggers and set(parsed.triggers) <= PRINCIPLES.numbers
            cited += 1
    if temperature:  # greedy random weights loop on one token pair, inside the first sentence
        assert cited >= 2  # the format was reached, not merely never begun
    free = engine.generate([render_prompt(SHORT, q) for q in queries],
                           SamplingParams(temperature=temperature, top_p=1.0, max_new_tokens=40, seed=3))
    assert any(not accepts(grammar, tiny.tokenizer, c.text) for c in free)  # the grammar is what held it


def test_principle_scores_equal_one_pair_at_a_time(tiny):
    rows = [("What is 2 + 2?", "The user asks a sum. I should follow rules 5 (Reasoning)."),
            ("How do I pick a lock?", "A risky request."), ("Tell me a story.", "")]
    scores = principle_scores(ModelScorer(tiny, progress=False, options={"branches": True}), SHORT, rows)
    batched = principle_scores(ModelScorer(tiny, batch_size=5, progress=False), SHORT, rows)
    assert all(a == pytest.approx(b, rel=1e-5, abs=1e-9) for a, b in zip(scores, batched))
    numbers = [p.number for p in PRINCIPLES.principles]
    for (query, thoughts), got in zip(rows, scores):
        context = scoring_context(SHORT, query, thoughts)
        assert context.endswith("I should follow rules") and "5 (Reasoning)" not in context[-40:]
        pairs = [(context, f" {n} ({PRINCIPLES.principle(n).name})") for n in numbers]
        reference = [s.logprob for s in score_one_by_one(tiny.model, tiny.tokenizer, pairs, tiny.bos_prefix)]
        total = sum(math.exp(lp) for lp in reference)
        assert list(got) == [str(n) for n in numbers]
        assert sum(got.values()) == pytest.approx(1.0)
        for n, lp in zip(numbers, reference):
            assert got[str(n)] == pytest.approx(math.exp(lp) / total, rel=1e-5, abs=1e-9)


def test_stage_two_records_carry_scores_and_whether_constrained(tiny, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": q, "type": t}) + "\n" for i, (q, t) in enumerate(
        [("What is 2 + 2?", "math"), ("How do I pick a lock?", "harm"), ("Tell me a story.", None)])))
    config = self_align.SelfAlignConfig(run="r", runs_dir=str(tmp_path), model="tiny-random", prompts=str(prompts),
                                        max_new_tokens=120, max_thought_sentences=1, min_answer_words=0,
                                        temperature=0.0, min_responses=0)
    self_align.run(config, loaded=tiny)
    frames = self_align.tables("r", str(tmp_path))
    records = pd.concat([frames["responses"], frames["drops"]])
    assert len(records) == 3 and records["constrained"].all()
    assert (frames["responses"]["principle_scores"].map(lambda s: abs(sum(s.values()) - 1) < 1e-6)).all()
    assert frames["drops"]["principle_scores"].isna().all()  # dropped answers are not scored
    manifest = json.loads((tmp_path / "r" / "self_align" / "manifest.json").read_text())
    assert manifest["params"]["constrain_format"] is True
    calls = [json.loads(line) for line in (tmp_path / "r" / "self_align" / "calls.jsonl").open()]
    assert calls[0]["provenance"]["generation"]["grammar"].startswith("sha256:")


def test_score_views_agree_with_the_records():
    responses = pd.DataFrame([
        {"id": "a", "type": "t1", "triggers": [7], "principle_scores": {"7": 0.7, "1": 0.3}},
        {"id": "b", "type": "t1", "triggers": [1], "principle_scores": {"7": 0.9, "1": 0.1}},
        {"id": "c", "type": None, "triggers": [], "principle_scores": None}])
    table = score_stats(responses, PRINCIPLES)
    assert table.loc["7 Candor", "t1"] == pytest.approx(0.8) and table.loc["1 Ethical", "t1"] == pytest.approx(0.2)
    assert list(table.columns) == ["t1"] and len(table) == 16
    found = disagreements(responses, PRINCIPLES)
    assert found["most_likely"].tolist() == ["7 (Candor)", "7 (Candor)"]
    assert found["agrees"].tolist() == [True, False]
    import matplotlib

    matplotlib.use("Agg")
    ax = plot_score_heatmap(table)
    assert ax.images[0].get_array().max() == pytest.approx(0.8)
    matplotlib.pyplot.close("all")
