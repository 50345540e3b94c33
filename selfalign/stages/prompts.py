"""Stage 1: topic-guided red-teaming self-instruct. The base model writes the prompts.

Two sources of prompts, filtered together:
- Self-Instruct: the model continues a numbered list of k sampled seed prompts (plus some it wrote
  earlier), and every new list item is a candidate;
- topic-guided red-teaming: for each adversarial instruction type in `principles/red_team_types.yaml`
  the model first brainstorms topics (a numbered list again, showing all or a sample of the type's
  topics), then writes the questions: scheme "topic" asks once per (type, topic) after a few seed
  questions of that type; scheme "mixed" (Dromedary's) asks for one question per (type, topic) hint,
  several hints of mixed types a request, after seed questions drawn across all types. Records keep
  type, topic and the seeds shown.

Candidates are dropped (with the reason, in drops.jsonl) when too short or long, when they ask for
images or files, or when they repeat a seed or a kept prompt: by ROUGE-L reaching the threshold for
the sources in `rouge_sources`, word for word for the others. A request too long for the model's
context is dropped there too, under its call's id, and the others go on.

Every model call is stored in calls.jsonl before its results are used, and all sampling choices come
from a seeded RNG replayed from those calls, so a rerun after an interruption rebuilds the same state
and only makes the calls that are missing. A stored call whose request text is not the one rebuilt
(an edited seed, type or template file under the same path) is refused rather than reused.
Prompt wording lives in `principles/red_team_templates.yaml`; the types and templates are read, and
completions parsed and filtered, by `selfalign.red_team`. This module only orchestrates: the calls,
their order and seeds, the dedup against what was kept, and the records.

Writes `runs/<run>/prompts/`: prompts.jsonl (schema prompt/1), topics.jsonl, drops.jsonl, calls.jsonl.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..config import GenerationSettings
from ..dedup import rouge_l_filter
from ..generation import Engine, SamplingParams, engine_for
from ..inputs import PRINCIPLES_DIR, PromptFileError, load_prompts
from ..public_data import seeds_path
from ..records import Run, provenance
from ..red_team import (clean_topic, example_pairs, filter_reason, hint_line, load_red_team_types, load_templates,
                        normal_form, numbered_list, parse_mixed, parse_numbered_list, plan_line)
from .common import (check_backend, check_model, check_ranges, check_room, drop_reasons, generate_into,
                     generation_record, settings_of, shortfall, stage_frames)

STAGE = "prompts"
SCHEMES = ("topic", "mixed")  # how red-team questions are requested (PromptsConfig.red_team_scheme)
SOURCES = ("self_instruct", "red_team")


@dataclass
class PromptsConfig(GenerationSettings):
    # a prompt file, or "self-instruct": Self-Instruct's 175 seed tasks as `selfalign data prepare` wrote them
    seeds: str = str(PRINCIPLES_DIR / "seed_prompts.jsonl")
    types: str = str(PRINCIPLES_DIR / "red_team_types.yaml")
    templates: str = str(PRINCIPLES_DIR / "red_team_templates.yaml")
    n_self_instruct: int = 8  # Self-Instruct prompts to keep
    calls_per_round: int = 8  # Self-Instruct list continuations per round
    k_seeds: int = 3  # seed prompts shown in each Self-Instruct call
    k_generated: int = 1  # generated prompts shown too, once there are some
    types_limit: int = 0  # use the first N instruction types (0: all)
    topics_per_type: int = 1
    topic_max_words: int = 6  # longest brainstormed topic kept, in words (paper: 3)
    topics_shown: int = 0  # topics shown per brainstorm call, a seeded sample of the type's pool (0: all; paper: 5)
    brainstorm_calls: int = 1  # brainstorm calls per type per round, each its own sample (paper: one per pooled topic)
    red_team_scheme: str = "topic"  # "topic": a request per (type, topic); "mixed": hints of mixed types (paper)
    n_per_topic: int = 1  # questions per (type, topic), scheme "topic" only ("mixed" writes one per hint)
    k_seed_questions: int = 5  # "mixed": seed questions shown per request, drawn across all types (paper: 5)
    questions_per_request: int = 5  # "mixed": (type, topic) hints per request, one question each (paper: 5)
    rouge_sources: tuple[str, ...] = ("self_instruct", "red_team")  # sources ROUGE-L filtered (paper: self_instruct)
    max_rounds: int = 4  # bound on Self-Instruct rounds and on brainstorming rounds
    rouge_threshold: float = 0.7
    min_words: int = 3
    max_words: int = 150
    list_max_new_tokens: int = 128  # Self-Instruct list continuations
    topic_max_new_tokens: int = 48  # a brainstormed list; the paper used 128, but few topics per type are kept here
    question_max_new_tokens: int = 64
    temperature: float = 1.0
    list_top_p: float = 0.98
    question_top_p: float = 0.95

    def __post_init__(self):
        if self.red_team_scheme not in SCHEMES:
            raise ValueError(f"red_team_scheme must be one of {', '.join(SCHEMES)}, got {self.red_team_scheme!r}")
        unknown = sorted(set(self.rouge_sources) - set(SOURCES))
        if unknown:
            raise ValueError(f"unknown rouge_sources {unknown}; choose from {', '.join(SOURCES)}")
        # 0 keeps a meaning where it is allowed: types_limit and topics_shown 0 mean all, and a
        # count of 0 asks for none of that kind.
        check_ranges(self, non_negative=("n_self_instruct", "k_seeds", "k_generated", "types_limit", "topics_per_type",
                                         "topics_shown", "n_per_topic", "max_rounds", "min_words", "max_words",
                                         "temperature"),
                     positive=("calls_per_round", "topic_max_words", "brainstorm_calls", "k_seed_questions",
                               "questions_per_request", "list_max_new_tokens", "topic_max_new_tokens",
                               "question_max_new_tokens"),
                     probabilities=("list_top_p", "question_top_p", "rouge_threshold"))
        check_backend(self.backend)


def run(config: PromptsConfig, loaded=None, engine: Engine | None = None) -> dict:
    """Write the stage's prompts; resume where an earlier run stopped. Returns the manifest.

    `loaded` reuses a loaded model; `engine` replaces the model altogether (tests use a scripted one).
    """
    # Before the run's folder is made. A mixed request asks for one question's budget per hint.
    per_request = config.questions_per_request if config.red_team_scheme == "mixed" else 1
    check_room(config.model, engine or loaded, list_max_new_tokens=config.list_max_new_tokens,
               topic_max_new_tokens=config.topic_max_new_tokens,
               question_max_new_tokens=config.question_max_new_tokens * per_request)
    stage = Run(config.run, config.runs_dir).stage(STAGE)
    # Everything that can fail without generating fails here, before the manifest records settings.
    seeds = _usable_seeds(config)
    types = load_red_team_types(config.types)[: config.types_limit or None]
    templates = load_templates(config.templates)
    if engine is None and loaded is None:
        check_model(config.model, config.backend)
    stage.start(settings_of(config), restart=config.restart)
    if engine is None:
        engine = engine_for(config, loaded)

    with stage.writer("calls.jsonl", "generation/1") as calls, \
            stage.writer("prompts.jsonl", "prompt/1") as prompts, \
            stage.writer("drops.jsonl", "drop/1") as drops, \
            stage.writer("topics.jsonl", "topic/1") as topics_file:
        done = {r["id"]: r for r in stage.read("calls.jsonl")}
        # Calls dropped as too long for the context: a resume must not make them after all.
        too_long = {r["id"]: r for r in stage.read("drops.jsonl") if "input_sha256" in r}

        def complete(items, params):
            """The call record of each (key, text) item, made now or found on disk; None for one
            too long for the context (a drop). A stored call whose text differs is refused."""
            def record(key, text, completion):
                done[key] = generation_record(key, text, completion,
                                              provenance(config.model, params.to_dict(), config.seed))
                return done[key]
            generate_into(calls, items, engine, params, record, drops=drops, earlier={**too_long, **done})
            return [done.get(key) for key, _ in items]

        kept = [("seed", s["prompt"]) for s in seeds]  # (source, text): what new prompts must not repeat
        self_instruct = _self_instruct(config, seeds, templates, kept, complete, prompts, drops)
        topics = _brainstorm(config, types, templates, complete, topics_file, drops)
        red_team = _red_team(config, types, topics, templates, kept, complete, prompts, drops)
        reasons = drop_reasons(stage.read("drops.jsonl"))

    filtered = [s for s in SOURCES if s in config.rouge_sources]
    counts = {"self_instruct": self_instruct, "red_team": red_team, "topics": sum(map(len, topics.values())),
              "model_calls": len(done), "drops": reasons,
              "rouge_compared_against": ["seeds", *filtered] if filtered else [],
              "rouge_threshold": config.rouge_threshold}
    short = []
    if self_instruct < config.n_self_instruct:
        short.append(f"Self-Instruct kept {self_instruct} of {config.n_self_instruct} after {config.max_rounds} rounds")
    thin = [t for t, found in topics.items() if len(found) < config.topics_per_type]
    if thin:
        short.append(f"{len(thin)} types got fewer than {config.topics_per_type} topics: {', '.join(thin)}")
    counts["shortfalls"] = short
    for line in short:
        print(f"[prompts] stopped short: {line} (raise max_rounds, or see drops.jsonl for why)")
    if not self_instruct + red_team:  # stage 2 needs at least one prompt
        raise stage.fail(shortfall(f"kept no prompt after {len(done)} model calls", reasons), counts)
    stage.finish(counts)
    return stage.manifest()


def target_count(config: PromptsConfig) -> int:
    """The prompts the stage aims to keep: n_self_instruct, and a question a (type, topic) pair
    (n_per_topic of them under scheme "topic"). An upper bound: the filters drop some."""
    types = len(load_red_team_types(config.types)[: config.types_limit or None])
    per_topic = config.n_per_topic if config.red_team_scheme == "topic" else 1
    return config.n_self_instruct + types * config.topics_per_type * per_topic


def tables(run: str, runs_dir: str = "runs") -> dict:
    """The stage's prompts, topics and drops as pandas DataFrames, for notebooks and reports."""
    return stage_frames(Run(run, runs_dir).stage(STAGE), {
        "prompts": ["id", "prompt", "source", "type", "topic", "seeds", "call"],
        "topics": ["id", "type", "topic", "call"], "drops": ["id", "reason", "text", "source", "type"]})


def _usable_seeds(config) -> list[dict]:
    seeds = load_prompts(seeds_path(config.seeds))
    usable = [s for s in seeds if filter_reason(s["prompt"], config.min_words, config.max_words) is None]
    if len(usable) < max(config.k_seeds, 1):
        raise PromptFileError(f"{config.seeds}: {len(usable)} usable seed prompts (of {len(seeds)}); "
                              f"need at least k_seeds={config.k_seeds} of {config.min_words}-{config.max_words} words")
    return usable


def _self_instruct(config, seeds, templates, kept, complete, prompts, drops) -> int:
    rng = random.Random(config.seed)
    params = SamplingParams(temperature=config.temperature, top_p=config.list_top_p,
                            max_new_tokens=config.list_max_new_tokens, seed=config.seed)
    source = provenance(config.model, params.to_dict(), config.seed)
    generated: list[dict] = []
    for round_ in range(config.max_rounds):
        if len(generated) >= config.n_self_instruct:
            break
        calls = []
        for j in range(config.calls_per_round):
            shown = rng.sample(seeds, config.k_seeds) + rng.sample(generated, min(config.k_generated, len(generated)))
            rng.shuffle(shown)
            text = self_instruct_request(templates, [s["prompt"] for s in shown])
            calls.append((f"si-{round_}-{j}", text, [s["id"] for s in shown]))
        candidates = []
        for (key, _, shown), call in zip(calls, complete([(k, t) for k, t, _ in calls], params)):
            if call is None:  # too long for the context: dropped unanswered
                continue
            items = parse_numbered_list(call["completion"], call["finish_reason"] == "length")
            if not items:
                drops.write({"id": key, "reason": "no list item in the model's output", "text": call["completion"]})
            candidates += [(f"{key}-{m}", item, {"source": "self_instruct", "type": None, "topic": None,
                                                 "seeds": shown, "call": key}) for m, item in enumerate(items)]
        generated += _keep("self_instruct", candidates, kept, config, prompts, drops, source,
                           limit=config.n_self_instruct - len(generated))
    return len(generated)


def _brainstorm(config, types, templates, complete, topics_file, drops) -> dict[str, list[str]]:
    params = SamplingParams(temperature=config.temperature, top_p=config.list_top_p,
                            max_new_tokens=config.topic_max_new_tokens, seed=config.seed)
    found: dict[str, list[str]] = {t.id: [] for t in types}
    for round_ in range(config.max_rounds):
        need = [t for t in types if len(found[t.id]) < config.topics_per_type]
        if not need:
            break
        calls = []
        for t in need:
            pool = list(t.seed_topics) + found[t.id]
            for c in range(config.brainstorm_calls):
                # Seeded by type, round and call, so a resume rebuilds the same prompts.
                rng = random.Random(f"{config.seed}/{t.id}/{round_}/{c}")
                shown = rng.sample(pool, config.topics_shown) if 0 < config.topics_shown < len(pool) else pool
                text = topics_request(templates, t, shown)
                # The first call keeps the key it had when there was one, so its sample is unchanged.
                calls.append((t, f"topics-{t.id}-{round_}" + (f"-{c}" if c else ""), text))
        for (t, key, _), call in zip(calls, complete([(key, text) for _, key, text in calls], params)):
            if call is None:
                continue
            seen = {s.lower() for s in t.seed_topics} | {s.lower() for s in found[t.id]}
            for m, item in enumerate(parse_numbered_list(call["completion"], call["finish_reason"] == "length")):
                topic = clean_topic(item)
                words = len(topic.split())
                reason = (f"not a short noun phrase (more than {config.topic_max_words} words)"
                          if words > config.topic_max_words else
                          "not a short noun phrase" if not words or topic.endswith("?") else
                          "repeated topic" if topic.lower() in seen else
                          "type has enough topics" if len(found[t.id]) >= config.topics_per_type else None)
                if reason:
                    drops.write({"id": f"{key}-{m}", "reason": reason, "text": item, "type": t.id})
                    continue
                seen.add(topic.lower())
                topics_file.write({"id": f"{t.id}-{len(found[t.id])}", "type": t.id, "topic": topic, "call": key})
                found[t.id].append(topic)
    return found


def _red_team(config, types, topics, templates, kept, complete, prompts, drops) -> int:
    questions = _mixed_questions if config.red_team_scheme == "mixed" else _topic_questions
    params, candidates = questions(config, types, topics, templates, complete, drops)
    source = provenance(config.model, params.to_dict(), config.seed)
    return len(_keep("red_team", candidates, kept, config, prompts, drops, source))


def _topic_questions(config, types, topics, templates, complete, drops):
    params = SamplingParams(temperature=config.temperature, top_p=config.question_top_p,
                            max_new_tokens=config.question_max_new_tokens, stop=("\nTopic:", "\n\n"),
                            seed=config.seed)
    calls, fields = [], {}
    for t in types:
        pairs = example_pairs(t)
        for ti, topic in enumerate(topics[t.id]):
            text = questions_request(templates, t, topic)
            for j in range(config.n_per_topic):
                key = f"rt-{t.id}-{ti}-{j}"
                calls.append((key, text))
                fields[key] = {"source": "red_team", "type": t.id, "topic": topic,
                               "seeds": [q for _, q in pairs], "call": key}
    candidates = []
    for (key, _), call in zip(calls, complete(calls, params)):
        if call is None:
            continue
        question = call["completion"].strip().split("\n")[0].strip()
        if call["finish_reason"] == "length" and not question.endswith(("?", ".")):
            drops.write({"id": key, "reason": "cut off", "text": question, **fields[key]})
            continue
        candidates.append((key, question, fields[key]))
    return params, candidates


def _mixed_questions(config, types, topics, templates, complete, drops):
    # One question per hint, so a request gets one question's budget per hint.
    params = SamplingParams(temperature=config.temperature, top_p=config.question_top_p,
                            max_new_tokens=config.question_max_new_tokens * config.questions_per_request,
                            stop=("\n\n",), seed=config.seed)
    rng = random.Random(f"{config.seed}/mixed")
    pairs = [(t, topic) for t in types for topic in topics[t.id]]
    rng.shuffle(pairs)
    examples = [(t, topic, question) for t in types for topic, question in example_pairs(t)]
    calls, requests = [], []
    for r, start in enumerate(range(0, len(pairs), config.questions_per_request)):
        hints = pairs[start:start + config.questions_per_request]
        shown = rng.sample(examples, min(config.k_seed_questions, len(examples)))
        numbered = list(enumerate(hints, len(shown) + 1))  # the list goes on after the examples
        calls.append((f"rt-mixed-{r}", mixed_request(templates, shown, hints)))
        requests.append((hints, [hint_line(n, t, topic) for n, (t, topic) in numbered], [q for *_, q in shown]))
    candidates = []
    for (key, _), (hints, expected, seeds), call in zip(calls, requests, complete(calls, params)):
        if call is None:  # the request's drop stands for its hints
            continue
        answers, cut = parse_mixed(call["completion"], expected, call["finish_reason"] == "length")
        for i, (t, topic) in enumerate(hints):
            # Ids come from the request and the hint's place in it, which a resume rebuilds alike.
            key_i, fields = f"{key}-{i}", {"source": "red_team", "type": t.id, "topic": topic, "seeds": seeds,
                                           "call": key}
            if i in answers and i != cut:
                candidates.append((key_i, answers[i], fields))
            else:
                drops.write({"id": key_i, "reason": "cut off" if i == cut else "no question for this hint",
                             "text": answers.get(i, ""), **fields})
    return params, candidates


# The request texts, one function a kind: the stage renders its calls with them, and the dry run
# (`selfalign.context_fit`) measures the longest ones against the model's context.

def self_instruct_request(templates, shown: list[str]) -> str:
    """A Self-Instruct call: the numbered list of `shown` prompts, to be continued."""
    return templates["self_instruct"].format(examples=numbered_list(shown), next=len(shown) + 1)


def topics_request(templates, t, shown: list[str]) -> str:
    """A brainstorm call for type `t`: the numbered list of `shown` topics, to be continued."""
    return templates["topics"].format(name=t.name, description=t.description, examples=numbered_list(shown),
                                      next=len(shown) + 1)


def questions_request(templates, t, topic: str) -> str:
    """A scheme-"topic" call: type `t`'s seed (topic, question) pairs, then `topic`."""
    examples = "\n\n".join(f"Topic: {seed_topic}\nQuestion: {question}" for seed_topic, question in example_pairs(t))
    return templates["questions"].format(name=t.name, description=t.description, examples=examples, topic=topic)


def mixed_request(templates, shown: list[tuple], hints: list[tuple]) -> str:
    """A scheme-"mixed" call: the `shown` (type, topic, question) examples, then the (type, topic)
    `hints` to write one question each for, numbered on after the examples."""
    numbered = list(enumerate(hints, len(shown) + 1))
    return templates["questions_mixed"].format(
        examples="\n".join(f"{hint_line(n, t, topic)} {q}" for n, (t, topic, q) in enumerate(shown, 1)),
        plan="\n".join(plan_line(n, t, topic) for n, (t, topic) in numbered),
        first=hint_line(numbered[0][0], *hints[0]))


def _keep(source, candidates, kept, config, prompts, drops, extra, limit=None) -> list[dict]:
    """Filter one source's (id, text, fields) candidates; write the kept and the dropped; return the kept.

    `kept` holds (source, text) of the seeds and of every prompt kept so far, and grows.
    Past `limit` kept prompts, the rest are dropped as surplus rather than kept."""
    clean = []
    for key, text, fields in candidates:
        reason = filter_reason(text, config.min_words, config.max_words)
        if reason:
            drops.write({"id": key, "reason": reason, "text": text, **fields})
        else:
            clean.append((key, text, fields))
    if source in config.rouge_sources:
        compared = [text for origin, text in kept if origin == "seed" or origin in config.rouge_sources]
        survivors = set(rouge_l_filter([text for _, text, _ in clean], config.rouge_threshold, existing=compared))
        repeat = f"near-duplicate (ROUGE-L >= {config.rouge_threshold})"
    else:
        # Dromedary ROUGE-filtered Self-Instruct only; an unfiltered source must still not repeat a
        # seed or a kept prompt word for word.
        seen, survivors, repeat = {normal_form(text) for _, text in kept}, set(), "exact duplicate"
        for index, (_, text, _) in enumerate(clean):
            if normal_form(text) not in seen:
                seen.add(normal_form(text))
                survivors.add(index)
    result = []
    for index, (key, text, fields) in enumerate(clean):
        if index not in survivors:
            drops.write({"id": key, "reason": repeat, "text": text, **fields})
            continue
        if limit is not None and len(result) >= limit:
            drops.write({"id": key, "reason": "target reached", "text": text, **fields})
            continue
        row = {"id": key, "prompt": text, **fields, "provenance": extra}
        prompts.write(row)
        kept.append((source, text))
        result.append(row)
    return result
