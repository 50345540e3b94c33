"""Stage 2: principle-driven self-alignment. The base model answers each prompt under principles.

Every stage-1 prompt is put after the same prefix (preamble, 16 principles, 5 exemplars whose
assistant thinks aloud and names the rules it follows) and the model continues after
"<Name> (internal thoughts):". Its continuation is split into thoughts and answer
(`selfalign.principles.parse_response`); the principles the thoughts cite are the triggers.
The prefix is identical for every query, so its key/value cache is computed once.

With `constrain_format` (the book's default; the paper generated freely, the `full` profile's
value), decoding follows the format's grammar (`selfalign.triggers.format_grammar`): a few sentences
of thoughts, "I should follow rules" with citations of the set's own principles only, the answer
marker, a free answer; every record says whether it was on (`constrained`). With
`score_principles`, each kept response also gets `principle_scores`: the model's probability of
citing each principle after its own thoughts (`selfalign.triggers.principle_scores`), computed
after generation in one scoring pass, when the calls are settled into responses and drops.

A response is dropped, with its reason, when it has no answer marker or no thoughts, runs into
max_new_tokens before the answer ended, is empty or too short, copies phrases peculiar to an exemplar or the closing exchange, opens with a blanket
refusal, opens with any apology (`drop_apologies`, as Dromedary's filter does), or (if asked) cites
principles the set lacks. `suppress` pushes down the first token of texts such as "Sorry" while
sampling, as Dromedary's logit bias did. An answer that starts repeating itself is cut
before the first repeated sentence and kept. A prompt too long for the model's context is dropped
unanswered. Nothing is lost silently: raw continuations are in calls.jsonl, kept ones in
responses.jsonl, the rest in drops.jsonl. Keeping fewer than `min_responses` fails the stage
(its manifest says `failed`, with the drops counted): stage 3 could not train on so few. A resume
refuses a prompt whose text changed under its id.

Reads: `runs/<run>/prompts/prompts.jsonl` (of a finished stage 1, or any prompt file) and `principles/`.
Writes: `runs/<run>/self_align/` calls.jsonl, responses.jsonl (schema response/1), drops.jsonl.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..generation import Engine, SamplingParams, engine_for
from ..generation.grammar import check_grammar
from ..config import GenerationSettings
from ..principles import PrincipleSet, load_principle_set, parse_response, render_prefix, render_prompt
from ..inputs import PRINCIPLES_DIR, load_prompts
from ..records import Run, RunError, provenance
from ..scoring import ModelScorer
from ..triggers import format_grammar, principle_scores
from .common import (check_backend, check_model, check_ranges, check_resume, check_room, drop_reasons, generate_into,
                     generation_record, settings_of, shortfall, stage_frames, stage_one_prompts)

STAGE = "self_align"


@dataclass
class SelfAlignConfig(GenerationSettings):
    prompts: str = ""  # prompt file; "": this run's stage-1 prompts
    principles: str = str(PRINCIPLES_DIR / "principles.yaml")
    exemplars: str = str(PRINCIPLES_DIR / "exemplars.yaml")
    template: str = str(PRINCIPLES_DIR / "self_align_template.yaml")
    assistant: str = "Watson"  # the name generated under (the paper's); stage 3 trains under another
    limit: int = 16  # answer only the first N prompts (0: all); 16 keeps a CPU run to minutes
    temperature: float = 0.5
    top_p: float = 0.95
    max_new_tokens: int = 160  # the paper used 256
    suppress: tuple[str, ...] = ()  # texts whose first token gets a -100 logit bias at every step (the paper: Sorry)
    min_answer_words: int = 3
    drop_apologies: bool = False  # drop answers that open with an apology (template's apology_openings; the paper: on)
    drop_unknown_citations: bool = False
    constrain_format: bool = True  # decode under the format's grammar (valid citations, the answer marker); the paper: off
    max_thought_sentences: int = 2  # with constrain_format: thoughts are 1 to this many sentences, then the rules sentence
    max_answer_sentences: int = 3  # with constrain_format: the answer ends after at most this many sentences (0: free)
    score_principles: bool = True  # store each kept response's principle_scores (likelihood of citing each principle)
    min_responses: int = 5  # fewer kept fail the stage (0: accept none); 5: stage 3's min_examples 4 + its holdout 1

    def __post_init__(self):
        check_ranges(self, non_negative=("limit", "temperature", "min_answer_words", "max_answer_sentences",
                                         "min_responses"),
                     positive=("max_new_tokens", "max_thought_sentences"),
                     probabilities=("top_p",))
        check_backend(self.backend)


def drop_reason(parsed, finish_reason: str, query: str, principle_set: PrincipleSet, config) -> str | None:
    """Why a parsed response should not become training data, or None."""
    if not parsed.has_answer_marker:
        return "no answer marker"
    if not parsed.thoughts:
        return "no internal thoughts"
    if finish_reason == "length" and not (parsed.cut_at_repeat or parsed.answer_closed):
        return "truncated at max_new_tokens"
    words = len(parsed.answer.split())
    if words == 0:
        return "empty answer"
    if words < config.min_answer_words:
        return f"answer shorter than {config.min_answer_words} words"
    lowered, query_lowered = parsed.answer.lower(), query.lower()
    for exemplar in principle_set.exemplars:
        for marker in exemplar.markers:
            if marker.lower() in lowered and marker.lower() not in query_lowered:
                return f"copies exemplar {exemplar.id} ({marker})"
    for line in principle_set.template["closing"].splitlines():
        said = line.split(":", 1)[-1].strip().lower()
        if said and said in lowered:
            return "copies the closing exchange"
    for opening in principle_set.template["refusal_openings"]:
        if parsed.answer.lower().startswith(opening.lower()):
            return f"blanket refusal ({opening})"
    if config.drop_apologies:
        for opening in principle_set.template["apology_openings"]:
            if parsed.answer.lower().startswith(opening.lower()):
                return f"opens with an apology ({opening})"
    if config.drop_unknown_citations and parsed.unknown_citations:
        return f"cites unknown principles ({', '.join(parsed.unknown_citations)})"
    return None


def sampling(config, principle_set: PrincipleSet) -> SamplingParams:
    """How stage 2 samples under `principle_set`: with `constrain_format`, under its format grammar."""
    grammar = (format_grammar(principle_set, config.assistant, config.max_thought_sentences, config.max_answer_sentences)
               if config.constrain_format else None)
    # Dromedary pushed "Sorry" down by 100 logits, so that answers do not open with an apology.
    return SamplingParams(temperature=config.temperature, top_p=config.top_p, max_new_tokens=config.max_new_tokens,
                          stop=("\nUser:",), seed=config.seed, logit_bias=tuple((text, -100.0) for text in config.suppress),
                          grammar=grammar)


def run(config: SelfAlignConfig, loaded=None, engine: Engine | None = None, scorer=None) -> dict:
    """Answer the prompts under the principles; resume where an earlier run stopped. `scorer` (a
    `selfalign.scoring` scorer) computes principle_scores; by default the engine's model does."""
    check_room(config.model, engine or loaded, max_new_tokens=config.max_new_tokens)  # before the run's folder is made
    run_dir = Run(config.run, config.runs_dir)
    stage = run_dir.stage(STAGE)
    # Everything that can fail without generating fails here, before the manifest records settings.
    principle_set = load_principle_set(config.principles, config.exemplars, config.template)
    # An edited principle is a new setting; min_responses is not one (it changes no record), so a
    # failed stage can be rerun with a lower bound and keep what it has.
    settings = {**{k: v for k, v in settings_of(config).items() if k != "min_responses"},
                "principles_hash": principle_set.hash}
    prompts = load_prompts(config.prompts or stage_one_prompts(run_dir))[: config.limit or None]
    if len(prompts) < config.min_responses:  # could only fail, after loading the model and generating
        raise RunError(f"{len(prompts)} prompts to answer (limit {config.limit}), fewer than min_responses="
                       f"{config.min_responses}: stage 2 could not keep enough for stage 3. Generate more prompts "
                       "in stage 1, raise --limit, or lower --min-responses")
    params = sampling(config, principle_set)
    if params.grammar is not None:
        check_grammar(params.grammar)  # a template whose format cannot be a grammar fails here, not at a batch
    if engine is None and loaded is None:
        check_model(config.model, config.backend)
    source = {row["id"]: row for row in prompts}
    items = [(row["id"], render_prompt(principle_set, row["prompt"], config.assistant)) for row in prompts]
    stored = {key: row["prompt"] for key, row in source.items()}  # the call records' `prompt`: the query
    check_resume(stage, settings, config.restart, "calls.jsonl", items, stored)
    stage.start(settings, restart=config.restart)

    if engine is None:
        engine = engine_for(config, loaded)
    origin = provenance(config.model, params.to_dict(), config.seed, principle_set.hash)

    with stage.writer("calls.jsonl", "generation/1") as calls, \
            stage.writer("responses.jsonl", "response/1") as responses, \
            stage.writer("drops.jsonl", "drop/1") as drops:

        def record(key, text, completion):
            return generation_record(key, source[key]["prompt"], completion, origin)

        def drop_fields(key):
            row = source[key]
            return {"prompt": row["prompt"], "type": row.get("type"), "topic": row.get("topic"),
                    "source": row.get("source")}

        generate_into(calls, items, engine, params, record, render_prefix(principle_set, config.assistant),
                      drops=drops, drop_fields=drop_fields, prompts=stored)
        # Calls are settled (parsed, kept or dropped, scored) after generation, in one scoring pass;
        # calls.jsonl is durable, so a kill before this point loses no generated text.
        pending = [call for call in stage.read("calls.jsonl")
                   if call["id"] in source and call["id"] not in responses and call["id"] not in drops]
        def scorer_for():
            return scorer or principle_scorer(config, engine, loaded, progress=engine.progress)

        settle(pending, source, principle_set, config, scorer_for, origin, responses, drops)
        kept, dropped = len(responses), len(drops)
        reasons = drop_reasons(stage.read("drops.jsonl"))

    counts = {"prompts": len(prompts), "responses": kept, "drops": dropped, "drop_reasons": reasons}
    if kept < config.min_responses:  # stage 3 could not train on so few: stop here, loudly
        raise stage.fail(shortfall(f"kept {kept} of {len(prompts)} prompts, fewer than min_responses="
                                   f"{config.min_responses}", reasons), counts)
    stage.finish(counts)
    return stage.manifest()


def settle(calls, source, principle_set, config, scorer_for, origin, responses, drops) -> None:
    """Parse each call's completion, drop it with its reason or keep it with its principle_scores;
    `scorer_for()` gives the scorer, asked for only when an answer is kept (with vLLM it loads the
    weights once more)."""
    fields, kept = [], []
    for call in calls:
        row = source[call["id"]]
        parsed = parse_response(principle_set, call["completion"], config.assistant)
        reason = drop_reason(parsed, call["finish_reason"], row["prompt"], principle_set, config)
        record = {"id": call["id"], "prompt": row["prompt"], "type": row.get("type"), "topic": row.get("topic"),
                  "source": row.get("source"), "thoughts": parsed.thoughts, "answer": parsed.answer,
                  "triggers": parsed.triggers, "unknown_citations": parsed.unknown_citations,
                  "principle_scores": None, "constrained": config.constrain_format,
                  "cut_at_repeat": parsed.cut_at_repeat, "finish_reason": call["finish_reason"],
                  "completion_tokens": call["completion_tokens"], "provenance": origin}
        fields.append((record, reason, call["completion"]))
        if reason is None:
            kept.append(record)
    if config.score_principles and kept:
        scores = principle_scores(scorer_for(), principle_set, [(r["prompt"], r["thoughts"]) for r in kept],
                                  config.assistant)
        for record, score in zip(kept, scores):
            record["principle_scores"] = score
    for record, reason, raw in fields:
        if reason:
            drops.write({**record, "reason": reason, "raw": raw})
        else:
            responses.write(record)


def principle_scorer(config, engine, loaded=None, progress: bool = True) -> ModelScorer:
    """The scorer of principle_scores (here and in leave-one-out): the engine's own Hugging Face
    model, or (vLLM, replicas) `loaded` or `config.model` loaded once more. One long context and
    sixteen short citations are scored as branches of one row (scoring.score_branches), from the
    principles' cache the generation left in its backend's store where it ran these same weights."""
    backend_loaded = getattr(engine.backend, "loaded", None)
    if backend_loaded is None and loaded is None:
        from ..models import load_model

        loaded = load_model(config.model)
    prefixes = getattr(engine.backend, "prefixes", None) if backend_loaded is not None else None
    return ModelScorer(backend_loaded or loaded, progress=progress, options={"branches": True, "prefixes": prefixes})


def tables(run: str, runs_dir: str = "runs") -> dict:
    """The stage's responses and drops as pandas DataFrames."""
    columns = ["id", "prompt", "type", "topic", "source", "thoughts", "answer", "triggers", "unknown_citations",
               "principle_scores", "constrained"]
    return stage_frames(Run(run, runs_dir).stage(STAGE),
                        {"responses": columns, "drops": columns + ["reason", "raw"]})


def records(run: str, runs_dir: str | Path = "runs") -> list[dict]:
    """The stage's kept (responses.jsonl) and dropped (drops.jsonl) records, each with `status`
    ("kept" or "dropped") and `raw`, the model's whole continuation (from calls.jsonl)."""
    if not (Path(runs_dir) / run / STAGE).is_dir():
        raise FileNotFoundError(f"{Path(runs_dir) / run / STAGE} does not exist: run stage 2 first "
                                f"(notebook 02, or `selfalign stage self-align --run {run}`)")
    where = Run(run, runs_dir).stage(STAGE)

    def read(name: str) -> list[dict]:
        return where.read(name) if (where.path / name).exists() else []

    calls = {c["id"]: c["completion"] for c in read("calls.jsonl")}
    return ([{**r, "status": "kept", "raw": calls.get(r["id"], "")} for r in read("responses.jsonl")]
            + [{**r, "status": "dropped", "raw": r.get("raw", calls.get(r["id"], ""))} for r in read("drops.jsonl")])


def plot_answer_lengths(responses, ax=None):
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3))
    words = responses["answer"].str.split().str.len() if len(responses) else []
    ax.hist(words, bins=20, color="#3a7")
    ax.set_xlabel("answer length (words)")
    ax.set_ylabel("responses")
    return ax

