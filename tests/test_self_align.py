import functools
import json

import matplotlib
import numpy as np
import pandas as pd
import pytest

from selfalign.generation import Completion, Engine
from selfalign.principles import load_principle_set
from selfalign.stages import self_align
from selfalign.scoring import Score
from selfalign.stages.self_align import SelfAlignConfig
from selfalign.triggers import plot_trigger_heatmap, trigger_stats

# What the scripted model "writes" for each query, and the finish reason.
SCRIPT = {
    "good": (" A fact question. I should follow rules 2 (Informative) and 7 (Candor).\n\nWatson: It is 42.\n", "stop"),
    "loop": (" Hm. I should follow rule 13.\nWatson: Step one is done. Step one is done. Step one is done", "length"),
    "nomarker": (" I am still thinking about this and never answer", "length"),
    "cutoff": (" I should follow rules 6 (Multi-Aspect).\nWatson: There are many aspects, such as", "length"),
    "copy": (" I should follow rules 11 (Numerical Sensitivity).\nWatson: So you pay $64.80 in total.\n", "stop"),
    "refuse": (" I should follow rules 1 (Ethical).\nWatson: I'm sorry, but I cannot do that.\n", "stop"),
    "short": (" I should follow rules 3 (Helpful).\nWatson: Yes.\n", "stop"),
    "unknown": (" I should follow rules 3 (Helpful) and 23 (Made Up).\nWatson: Here is a helpful answer.\n", "stop"),
}


class ScriptedBackend:
    name = "scripted"

    def __init__(self):
        self.prompts = []
        self.params = []

    def count_tokens(self, texts, shared_prefix=None):
        return [len(t) // 8 for t in texts]

    def stream_batch(self, prompts, params, seeds, shared_prefix, max_prompt_tokens):
        self.prompts += prompts
        self.params.append(params)
        outputs = []
        for prompt in prompts:
            query = prompt.rsplit("User: ", 1)[1].split("\n")[0]
            text, finish = SCRIPT[query]
            if "Be candid" in prompt and query == "good":  # an edited principle changes this answer
                text = text.replace("It is 42.", "I am not sure; maybe 42.")
            outputs.append(Completion(text, finish, 100, 20, "\nUser:" if finish == "stop" else None))
        return outputs


def scripted_scorer(requests):
    """Likes short citations: enough to tell scored records from unscored ones without a model."""
    return [Score(-float(len(continuation)), 1, len(continuation), len(continuation)) for _, continuation in requests]


# The scripted answers have no model behind them; their principle_scores come from scripted_scorer.
run = functools.partial(self_align.run, scorer=scripted_scorer)


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": key, "prompt": key, "type": "t1" if i % 2 else "t2",
                                        "source": "red_team"}) + "\n" for i, key in enumerate(SCRIPT)))
    return path


def test_stage_keeps_good_answers_and_drops_the_rest_with_reasons(tmp_path, prompts_file):
    backend = ScriptedBackend()
    manifest = run(SelfAlignConfig(run="r", runs_dir=str(tmp_path), prompts=str(prompts_file), min_responses=0),
                   engine=Engine(backend, batch_size=3, progress=False))
    out = tmp_path / "r" / "self_align"
    responses = {r["id"]: r for r in map(json.loads, (out / "responses.jsonl").read_text().splitlines())}
    drops = {r["id"]: r["reason"] for r in map(json.loads, (out / "drops.jsonl").read_text().splitlines())}
    assert responses["good"]["answer"] == "It is 42." and responses["good"]["triggers"] == [2, 7]
    # Scored after generation: the scripted scorer favours the shortest citations, " 7 (Candor)" and " 9 (Static)".
    scores = responses["good"]["principle_scores"]
    assert {n for n in scores if scores[n] == max(scores.values())} == {"7", "9"}
    assert sum(scores.values()) == pytest.approx(1.0) and scores["7"] > scores["14"]
    assert all(r["principle_scores"] and r["constrained"] for r in responses.values())
    assert responses["loop"]["answer"] == "Step one is done." and responses["loop"]["cut_at_repeat"]
    assert responses["unknown"]["unknown_citations"] == ["23"]
    assert drops == {"nomarker": "no answer marker", "cutoff": "truncated at max_new_tokens",
                     "copy": "copies exemplar step_by_step_numerical (pay $64.80 in total)",
                     "refuse": "blanket refusal (I'm sorry, but I cannot)", "short": "answer shorter than 3 words"}
    assert manifest["counts"]["responses"] == 3 and manifest["counts"]["drops"] == 5
    assert responses["good"]["provenance"]["principles_hash"] == load_principle_set().hash
    # Every prompt shared one prefix, handed to the engine for caching.
    assert all(p.startswith(self_align.render_prefix(load_principle_set(), "Watson")) for p in backend.prompts)


def test_resume_makes_no_new_calls_and_settles_unsettled_ones(tmp_path, prompts_file):
    config = SelfAlignConfig(run="r", runs_dir=str(tmp_path), prompts=str(prompts_file), min_responses=0)
    run(config, engine=Engine(ScriptedBackend(), progress=False))
    out = tmp_path / "r" / "self_align"
    before = (out / "responses.jsonl").read_text()
    (out / "responses.jsonl").unlink()  # as if killed after the calls were stored
    again = ScriptedBackend()
    run(config, engine=Engine(again, progress=False))
    assert again.prompts == []
    assert sorted(before.splitlines()) == sorted((out / "responses.jsonl").read_text().splitlines())


def test_unknown_citations_can_be_dropped(tmp_path, prompts_file):
    run(SelfAlignConfig(run="r", runs_dir=str(tmp_path), prompts=str(prompts_file), drop_unknown_citations=True,
                        min_responses=0), engine=Engine(ScriptedBackend(), progress=False))
    drops = (tmp_path / "r" / "self_align" / "drops.jsonl").read_text()
    assert "cites unknown principles (23)" in drops


def test_ablation_shows_changed_answers():
    from selfalign.ablation import ablate

    principles = load_principle_set()
    table = ablate(list(SCRIPT)[:3], Engine(ScriptedBackend(), progress=False), principles,
                   principles.with_text(7, "Be candid about uncertainty."))
    assert table["answer_changed"].tolist() == [True, False, False]
    assert table.loc[0, "answer_b"] == "I am not sure; maybe 42."
    assert not table["triggers_changed"].any()
    assert table["answer_overlap"].tolist()[1:] == [1.0, 1.0] and 0 < table.loc[0, "answer_overlap"] < 1


def test_trigger_stats_and_heatmap():
    principles = load_principle_set()
    responses = pd.DataFrame([{"id": "a", "type": "t1", "triggers": [1, 2], "answer": "x y"},
                              {"id": "b", "type": "t1", "triggers": [2], "answer": "x"},
                              {"id": "c", "type": None, "triggers": [], "answer": "z"}])
    overall, per_type = trigger_stats(responses, principles)
    assert overall.loc["2 Informative", "responses"] == 2
    assert overall.loc["2 Informative", "share"] == pytest.approx(2 / 3)
    assert per_type.loc["1 Ethical", "t1"] == 0.5 and per_type.loc["2 Informative", "t1"] == 1.0
    assert len(overall) == 16
    assert list(per_type.columns) == ["(self-instruct)", "t1"] and per_type["(self-instruct)"].sum() == 0
    nothing_fired = responses.assign(triggers=[[], [], []])
    assert trigger_stats(nothing_fired, principles)[1].shape == (16, 2)
    matplotlib.use("Agg")
    # The heatmap shows these shares: its cells are per_type's values, its rows the principles and
    # its columns the types.
    ax = plot_trigger_heatmap(per_type)
    (image,) = ax.images
    assert np.asarray(image.get_array()).tolist() == per_type.to_numpy(dtype=float).tolist()
    assert np.asarray(image.get_array())[list(per_type.index).index("2 Informative"), 1] == 1.0
    assert [t.get_text() for t in ax.get_yticklabels()] == [f"{p.number} {p.name}" for p in principles.principles]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["(self-instruct)", "t1"]
    empty = plot_trigger_heatmap(trigger_stats(responses.iloc[0:0], principles)[1])
    assert not empty.images and [t.get_text() for t in empty.texts] == ["no responses"]
    matplotlib.pyplot.close("all")


def test_paper_filter_drops_every_apology_and_suppresses_sorry(tmp_path, prompts_file):
    """Dromedary's stage 2: "Sorry" pushed down by 100 logits while sampling, and any answer that
    opens with an apology dropped (ours drops only blanket refusals by default)."""
    SCRIPT["apology"] = (" I should follow rules 7 (Candor).\nWatson: I am sorry to hear that. Here is what helps.\n",
                         "stop")
    try:
        with open(prompts_file, "a") as handle:
            handle.write(json.dumps({"id": "apology", "prompt": "apology"}) + "\n")
        backend = ScriptedBackend()
        run(SelfAlignConfig(run="default", runs_dir=str(tmp_path), prompts=str(prompts_file), min_responses=0),
            engine=Engine(backend, progress=False))
        assert backend.params[0].logit_bias == ()
        kept = {r["id"] for r in map(json.loads, (tmp_path / "default/self_align/responses.jsonl").open())}
        assert "apology" in kept
        backend = ScriptedBackend()
        manifest = run(SelfAlignConfig(run="paper", runs_dir=str(tmp_path), prompts=str(prompts_file),
                                       suppress=("Sorry",), drop_apologies=True, min_responses=0),
                       engine=Engine(backend, progress=False))
        assert backend.params[0].logit_bias == (("Sorry", -100.0),)
        drops = {r["id"]: r["reason"] for r in map(json.loads, (tmp_path / "paper/self_align/drops.jsonl").open())}
        assert drops["apology"] == "opens with an apology (I am sorry)"
        assert manifest["params"]["suppress"] == ["Sorry"] and manifest["params"]["drop_apologies"] is True
    finally:
        del SCRIPT["apology"]
