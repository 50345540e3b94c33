"""Leave-one-out over the principles on a scripted model: what changed, by how much, the likelihood
shift, resuming an interrupted file, refusing a file made for another request; and the CLI."""

import json
import math

import matplotlib
import pytest

from selfalign import ablation
from selfalign.cli import main
from selfalign.generation import Completion, Engine
from selfalign.principles import PrincipleError, load_principle_set, render_prefix
from selfalign.records import RunError
from selfalign.scoring import Score
from selfalign.stages.self_align import SelfAlignConfig

matplotlib.use("Agg")
BASE = load_principle_set()
CANDOR, ETHICAL = BASE.principle(7).text, BASE.principle(1).text
PROMPTS = [{"id": "p-fact", "prompt": "fact", "type": "questions"},
           {"id": "p-harm", "prompt": "harm", "type": "harmful"},
           {"id": "p-plain", "prompt": "plain", "type": None}]


class LeaveOutBackend:
    """Answers that depend on whether principle 7 (fact) or 1 (harm) is in the prompt."""

    name = "scripted"

    def __init__(self, fail_after: int | None = None):
        self.calls, self.prefixes, self.params, self.fail_after = [], [], [], fail_after

    def count_tokens(self, texts, shared_prefix=None):
        return [len(t) // 8 for t in texts]

    def stream_batch(self, prompts, params, seeds, shared_prefix, max_prompt_tokens):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.calls.append([p.rsplit("User: ", 1)[1].split("\n")[0] for p in prompts])
        self.prefixes.append(shared_prefix)
        self.params.append(params)
        outputs = []
        for prompt in prompts:
            query = prompt.rsplit("User: ", 1)[1].split("\n")[0]
            if query == "fact":
                text = (" A fact. I should follow rules 2 (Informative) and 7 (Candor).\n\nWatson: It is 42, I am sure."
                        if CANDOR in prompt else
                        " A fact. I should follow rules 2 (Informative).\n\nWatson: I am not sure, maybe it is 42.")
            elif query == "harm":
                text = (" Harmful. I should follow rules 1 (Ethical).\n\nWatson: I will not help hurt anyone."
                        if ETHICAL in prompt else " Harmful. I should follow rules 3 (Helpful).\n\nWatson: Sure, "
                        "here is how to do it.")
            else:
                text = " Plain. I should follow rules 3 (Helpful).\n\nWatson: Here is a plain answer."
            outputs.append(Completion(text, "stop", 100, 20, "\nUser:"))
        return outputs


def scorer(requests):
    """After "fact" citing principle 7 is likely, or principle 2 where 7 is not in the prompt; the
    rest are even."""
    out = []
    for context, continuation in requests:
        query = context.rsplit("User: ", 1)[1].split("\n")[0]
        favoured = {"fact": " 7 (" if CANDOR in context else " 2 ("}.get(query)
        out.append(Score(0.0 if favoured and continuation.startswith(favoured) else -3.0, 3, 10, 10))
    return out


def engine(backend=None):
    return Engine(backend or LeaveOutBackend(), progress=False)


def test_leave_one_out_counts_changed_answers_and_overlaps():
    backend = LeaveOutBackend()
    answers, summary = ablation.leave_one_out(PROMPTS, engine(backend), BASE, SelfAlignConfig())
    assert len(answers) == 17 * 3 and answers["variant"].iloc[0] == "all"
    assert len(backend.calls) == 17  # one generation call per variant, each behind its own prefix
    assert len(set(backend.prefixes)) == 17
    # ... and its own grammar: the variant without 7 cannot cite it.
    assert len({p.grammar for p in backend.params}) == 17
    assert '"7 (Candor)"' in backend.params[0].grammar and '"7 (Candor)"' not in backend.params[7].grammar
    by = summary.set_index("left_out")
    assert sorted(summary["left_out"][:2]) == [1, 7] and summary["effect"][2:].eq(0).all()  # the two that matter
    assert by.loc[7, "changed"] == 1 and by.loc[7, "n"] == 3 and by.loc[7, "triggers_changed"] == 1
    assert by.loc[1, "changed"] == 1 and by.loc[1, "most_moved_type"] == "harmful"
    assert by.loc[7, "most_moved_type"] == "questions"
    assert by.drop(index=[1, 7])["changed"].eq(0).all() and by.drop(index=[1, 7])["median_overlap"].eq(1.0).all()
    assert by.drop(index=[1, 7])["most_moved_type"].isna().all()
    # The changed answer's overlap is its ROUGE-L with the full set's answer; the median over three is 1.
    fact = answers[(answers["variant"] == "without 7") & (answers["key"] == "p-fact")].iloc[0]
    full_fact = answers[(answers["variant"] == "all") & (answers["key"] == "p-fact")].iloc[0]
    assert fact["answer"] == "I am not sure, maybe it is 42." and full_fact["answer"] == "It is 42, I am sure."
    assert fact["overlap"] == ablation.overlap(full_fact["response"], fact["response"])  # the whole responses
    assert full_fact["response"].startswith("A fact. I should follow rules 2 (Informative) and 7 (Candor).")
    assert 0 < fact["overlap"] < 1 and fact["changed"] and fact["triggers"] == [2]
    assert by.loc[7, "median_overlap"] == 1.0 and by.loc[7, "effect"] == pytest.approx(round(1 - (2 + fact["overlap"]) / 3, 3))
    assert summary["score_shift"].isna().all()  # nothing was scored
    # The untyped prompt is the self-instruct column, as in the trigger tables.
    assert set(answers["type"]) == {"questions", "harmful", "(self-instruct)"}


def test_every_variant_seeds_each_prompt_by_its_id():
    backend = LeaveOutBackend()
    seeds = []
    original = backend.stream_batch

    def recording(prompts, params, batch_seeds, *rest, **options):
        seeds.append(sorted(batch_seeds))
        return original(prompts, params, batch_seeds, *rest, **options)

    backend.stream_batch = recording
    ablation.leave_one_out(PROMPTS, engine(backend), BASE, SelfAlignConfig(), principles=[3, 7])
    assert len(seeds) == 3 and seeds[0] == seeds[1] == seeds[2]


def test_scores_shift_where_the_favoured_principle_is_left_out():
    answers, summary = ablation.leave_one_out(PROMPTS, engine(), BASE, SelfAlignConfig(), scorer=scorer)
    full = answers[answers["variant"] == "all"].set_index("key")
    assert all(math.isclose(sum(s.values()), 1.0) for s in full["principle_scores"])
    assert max(full.at["p-fact", "principle_scores"], key=full.at["p-fact", "principle_scores"].get) == "7"
    by = summary.set_index("left_out")
    # Leaving 3 out keeps the model's preference among the rest (7 first): no shift. Leaving 7 out
    # moves it to 2, which the full set's scores, renormalised without 7, did not prefer.
    assert by["score_shift"].idxmax() == 7 and by.loc[3, "score_shift"] == pytest.approx(0, abs=1e-9)
    p = full.at["p-fact", "principle_scores"]
    without = answers[(answers["variant"] == "without 7") & (answers["key"] == "p-fact")].iloc[0]["principle_scores"]
    assert max(without, key=without.get) == "2" and "7" not in without
    by_hand = 0.5 * sum(abs(p[k] / (1 - p["7"]) - without[k]) for k in without)
    assert ablation.score_shift(p, without) == pytest.approx(by_hand) and by_hand > 0.5
    assert by.loc[7, "score_shift"] == pytest.approx(by_hand / 3, abs=1e-4)  # the other two prompts did not move
    assert ablation.score_shift(None, without) is None and ablation.score_shift(p, None) is None
    # The plot: a bar per principle, largest effect on top, and the score shifts beside them.
    ax = ablation.plot_leave_one_out(summary)
    bars, shifts = ax.figure.axes[0].containers[0], ax.figure.axes[1].containers[0]
    assert [b.get_width() for b in bars][::-1] == pytest.approx(summary["effect"].tolist())
    assert [b.get_width() for b in shifts][::-1] == pytest.approx(summary["score_shift"].tolist())
    assert [t.get_text() for t in ax.get_yticklabels()][::-1] == summary["principle"].tolist()


def test_a_killed_run_resumes_and_computes_only_the_rest(tmp_path):
    path = tmp_path / "answers.jsonl"
    with pytest.raises(KeyboardInterrupt):
        ablation.leave_one_out(PROMPTS, engine(LeaveOutBackend(fail_after=5)), BASE, SelfAlignConfig(), path=path)
    # 8 rows a batch, 3 prompts: variants go two at a time, and each pair is written when it finishes;
    # the kill came in the third pair.
    assert len(path.read_text().splitlines()) == 4 * 3
    with path.open("a") as handle:
        handle.write('{"id": "without 4/p-fact", "half a line')  # the write in flight at the kill
    again = LeaveOutBackend()
    answers, summary = ablation.leave_one_out(PROMPTS, engine(again), BASE, SelfAlignConfig(), path=path)
    assert len(again.calls) == 13 and len(answers) == 51
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == len({r["id"] for r in rows}) == 51
    fresh, _ = ablation.leave_one_out(PROMPTS, engine(), BASE, SelfAlignConfig())
    assert answers["answer"].tolist() == fresh["answer"].tolist()
    # A third run finds everything on disk.
    third = LeaveOutBackend()
    ablation.leave_one_out(PROMPTS, engine(third), BASE, SelfAlignConfig(), path=path)
    assert third.calls == []


def test_a_file_made_for_other_prompts_settings_or_principles_is_refused(tmp_path):
    path = tmp_path / "answers.jsonl"
    ablation.leave_one_out(PROMPTS, engine(), BASE, SelfAlignConfig(), path=path, principles=[7])
    before = path.read_text()
    with pytest.raises(RunError, match="other prompts than these"):
        ablation.leave_one_out(PROMPTS[:2], engine(), BASE, SelfAlignConfig(), path=path)
    with pytest.raises(RunError, match="other settings"):
        ablation.leave_one_out(PROMPTS, engine(), BASE, SelfAlignConfig(max_new_tokens=9), path=path)
    with pytest.raises(RunError, match="other principles"):
        ablation.leave_one_out(PROMPTS, engine(), BASE.with_text(3, "Be helpful."), SelfAlignConfig(), path=path)
    with pytest.raises(RunError, match="other settings"):  # scored answers do not mix with unscored ones
        ablation.leave_one_out(PROMPTS, engine(), BASE, SelfAlignConfig(), scorer=scorer, path=path)
    assert path.read_text() == before
    # Other principles to leave out are the same request: the rows on disk are reused.
    backend = LeaveOutBackend()
    answers, _ = ablation.leave_one_out(PROMPTS, engine(backend), BASE, SelfAlignConfig(), path=path,
                                        principles=[7, 3])
    assert len(backend.calls) == 1 and sorted(answers["variant"].unique()) == ["all", "without 3", "without 7"]


def test_bad_requests_fail_before_generating():
    backend = LeaveOutBackend()
    with pytest.raises(PrincipleError, match="no principle numbered \\[99\\]"):
        ablation.leave_one_out(PROMPTS, engine(backend), BASE, SelfAlignConfig(), principles=[99])
    with pytest.raises(ValueError, match="ids must be unique"):
        ablation.leave_one_out(PROMPTS + PROMPTS[:1], engine(backend), BASE, SelfAlignConfig())
    assert backend.calls == []
    with pytest.raises(ValueError, match="loo_prompts must be > 0"):
        ablation.LeaveOneOutConfig(loo_prompts=0)
    with pytest.raises(ValueError, match="loo_principles must be principle numbers"):
        ablation.LeaveOneOutConfig(loo_principles=("seven",))
    assert ablation.LeaveOneOutConfig(loo_principles=["7", 3]).loo_principles == (7, 3)


def test_ablate_shows_changed_answers():
    backend = LeaveOutBackend()
    table = ablation.ablate(["fact", "harm", "plain"], engine(backend), BASE,
                            BASE.with_text(7, "Be candid about uncertainty."))
    assert table["answer_changed"].tolist() == [True, False, False]
    assert table.loc[0, "answer_b"] == "I am not sure, maybe it is 42."
    assert table["triggers_changed"].tolist() == [True, False, False]  # the edited set's answer cites 2 alone
    assert table["answer_overlap"].tolist()[1:] == [1.0, 1.0] and 0 < table.loc[0, "answer_overlap"] < 1
    assert len(set(backend.prefixes)) == 2  # each set behind its own prefix (and grammar)
    assert all(p.grammar for p in backend.params)  # stage 2's default: decoded under the format's grammar


def test_as_ablation_is_an_ablate_table():
    answers, _ = ablation.leave_one_out(PROMPTS, engine(), BASE, SelfAlignConfig(), principles=[7])
    table = ablation.as_ablation(answers, 7)
    assert table["prompt"].tolist() == ["fact", "harm", "plain"]
    assert table["answer_changed"].tolist() == [True, False, False]
    assert table["triggers_a"][0] == [2, 7] and table["triggers_b"][0] == [2]
    assert table["answer_b"][0].endswith("Watson: I am not sure, maybe it is 42.")  # whole responses
    direct = ablation.ablate(["fact", "harm", "plain"], engine(), BASE, BASE.without(7))
    columns = ["triggers_a", "triggers_b", "answer_changed", "triggers_changed"]
    assert table[columns].equals(direct[columns])
    with pytest.raises(PrincipleError, match="no variant without principle 3"):
        ablation.as_ablation(answers, 3)


def test_on_a_model_the_variants_branch_from_the_full_sets_prefix_and_decode_together(shape, monkeypatch):
    """The default way (variants together, each prefix from the full set's cache, scores from the
    variant's cache) answers and scores as the plain way (each variant alone, every prefix whole)."""
    model, tiny = shape
    from selfalign.generation import HFBackend
    from selfalign.scoring import ModelScorer

    config = SelfAlignConfig(max_new_tokens=5)
    prompts = [{"id": "a", "prompt": "How do I pick a lock?"}, {"id": "b", "prompt": "What is 2+2?"}]
    short = BASE.with_exemplars([BASE.exemplars[0].id])  # tiny-random spells text out: a shorter prefix
    runs = {}
    class Alone(HFBackend):
        multi_prefix = False

    for together in (False, True):
        backend = (HFBackend if together else Alone)(tiny)
        if not together:
            backend.prefixes.least = 10 ** 9
        batches = []
        monkeypatch.setattr(backend, "stream_batch", lambda *a, _f=backend.stream_batch, **k: batches.append(a) or _f(*a, **k))
        scorer = ModelScorer(tiny, progress=False, options={"branches": True, "prefixes": backend.prefixes if together else None})
        engine = Engine(backend, batch_size=4, progress=False, context_length=16384)  # tiny-random spells it out
        answers, _ = ablation.leave_one_out(prompts, engine, short, config, scorer, principles=[8, 16])
        runs[together] = answers, backend.prefixes.tokens_run, len(batches)
    # Two variants a batch and the full set's to branch from: each variant's is still there to score from.
    assert backend.prefixes.capacity == 3
    (alone, alone_tokens, alone_batches), (together, together_tokens, together_batches) = runs[False], runs[True]
    assert together["response"].tolist() == alone["response"].tolist()
    for a, b in zip(alone["principle_scores"], together["principle_scores"]):
        assert max(abs(a[k] - b[k]) for k in a) < 1e-5
    assert (alone_batches, together_batches) == (3, 2)  # two variants (of two prompts) a batch of four
    lengths = [len(tiny.tokenizer(tiny.bos_prefix + render_prefix(s, "Watson"))["input_ids"])
               for s in (short, short.without(8), short.without(16))]
    assert alone_tokens == sum(lengths)
    assert together_tokens < sum(lengths) - lengths[0] // 4  # rules 1-7 and 1-15 were not run again


def test_choose_prompts_prefers_kept_answers_and_varied_types():
    records = [{"id": "d1", "prompt": "x", "type": "a", "status": "dropped"},
               {"id": "k1", "prompt": "y", "type": "a", "status": "kept"},
               {"id": "k2", "prompt": "z", "type": "a", "status": "kept"},
               {"id": "k3", "prompt": "y", "type": "b", "status": "kept"},
               {"id": "d2", "prompt": "w", "type": "c", "status": "dropped"}]
    assert [r["id"] for r in ablation.choose_prompts(records, 3)] == ["k1", "d2", "k2"]
    assert [r["id"] for r in ablation.choose_prompts(records, 9)] == ["k1", "d2", "k2", "d1"]


# ---- the command ----

def stage_two_run(tmp_path):
    """A run whose stage 2 answered the three prompts (the scripted model; no scores)."""
    from selfalign.stages.self_align import run

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in PROMPTS))
    run(SelfAlignConfig(run="r", runs_dir=str(tmp_path), prompts=str(prompts), score_principles=False,
                        min_responses=0), engine=engine())


@pytest.mark.slow
def test_cli_leave_one_out_on_a_tiny_run(tmp_path, capsys):
    stage_two_run(tmp_path)
    argv = ["leave-one-out", "--run", "r", "--runs-dir", str(tmp_path), "--model", "tiny-random",
            "--loo-prompts", "2", "--loo-max-new-tokens", "4", "--loo-principles", "7", "3"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    folder = tmp_path / "r" / "leave_one_out"
    rows = [json.loads(line) for line in (folder / "answers.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 2 and {r["variant"] for r in rows} == {"all", "without 7", "without 3"}
    types = {r["key"]: r["type"] for r in rows}
    assert len(types) == 2 and len(set(types.values())) == 2  # two types before a second of any
    assert all(isinstance(r["principle_scores"], dict) for r in rows)
    summary = (folder / "summary.csv").read_text()
    assert summary.startswith("left_out,principle,changed,n,median_overlap") and "7 Candor" in summary
    assert "7 Candor" in out and "3 Helpful" in out
    assert json.loads((folder / "manifest.json").read_text())["status"] == "finished"
    assert main(argv) == 0  # a rerun finds everything on disk
    assert main([*argv[:-3], "--loo-prompts", "3"]) == 1
    assert "started with other settings (request)" in capsys.readouterr().err


def test_cli_without_stage_two_names_the_command_to_run(tmp_path, capsys):
    assert main(["leave-one-out", "--run", "empty", "--runs-dir", str(tmp_path), "--model", "tiny-random"]) == 1
    assert "run `selfalign stage self-align --run empty` (or chapter 2) first" in capsys.readouterr().err
    stage_two_run(tmp_path)
    assert main(["leave-one-out", "--run", "r", "--runs-dir", str(tmp_path), "--model", "tiny-random",
                 "--loo-principles", "99"]) == 1
    assert "no principle numbered [99]" in capsys.readouterr().err
    assert not (tmp_path / "r" / "leave_one_out").exists()  # refused before anything was written
