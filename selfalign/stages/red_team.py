"""Stage 1: topic-guided red-teaming self-instruct. The base model writes the prompts.

Two sources of prompts, filtered together:
- Self-Instruct: the model continues a numbered list of k sampled seed prompts (plus some it wrote
  earlier), and every new list item is a candidate;
- topic-guided red-teaming: for each adversarial instruction type in `principles/red_team_types.yaml`
  the model first brainstorms topics (a numbered list again), then writes one question per
  (type, topic) after a few seed questions of that type. Records keep type, topic and seeds.

Candidates are dropped (with the reason, in drops.jsonl) when too short or long, when they ask for
images or files, or when their ROUGE-L against a seed or a kept prompt reaches the threshold.

Every model call is stored in calls.jsonl before its results are used, and all sampling choices come
from a seeded RNG replayed from those calls, so a rerun after an interruption rebuilds the same state
and only makes the calls that are missing. Prompt wording lives in `principles/red_team_templates.yaml`.

Writes `runs/<run>/prompts/`: prompts.jsonl (schema prompt/1), topics.jsonl, drops.jsonl, calls.jsonl.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from ..dedup import rouge_l_filter
from ..generate import Engine, SamplingParams, engine_for
from ..models import DEFAULT_MODEL
from ..prompts import PRINCIPLES_DIR, PromptFileError, check_templates, load_prompts, read_yaml
from ..records import Run, provenance
from .common import drop_reasons, generate_into, generation_record, settings_of, stage_frames

STAGE = "prompts"
# Self-Instruct's own list of words that mark a task a text model cannot do.
NON_TEXT_WORDS = ["image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
                  "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram"]
_NON_TEXT = re.compile(r"\b(" + "|".join(re.escape(w) for w in NON_TEXT_WORDS) + r")\b", re.IGNORECASE)
_ITEM = re.compile(r"^\s*(\d+)\s*[.)]\s*(.*)$")


@dataclass
class PromptsConfig:
    run: str = "demo"  # run name: results go to <runs_dir>/<run>/prompts/
    runs_dir: str = "runs"
    model: str = DEFAULT_MODEL
    seeds: str = str(PRINCIPLES_DIR / "seed_prompts.jsonl")  # or Self-Instruct's seed_tasks.jsonl
    types: str = str(PRINCIPLES_DIR / "red_team_types.yaml")
    templates: str = str(PRINCIPLES_DIR / "red_team_templates.yaml")
    n_self_instruct: int = 16  # Self-Instruct prompts to keep
    calls_per_round: int = 8  # Self-Instruct list continuations per round
    k_seeds: int = 3  # seed prompts shown in each Self-Instruct call
    k_generated: int = 1  # generated prompts shown too, once there are some
    types_limit: int = 0  # use the first N instruction types (0: all)
    topics_per_type: int = 2
    n_per_topic: int = 1  # questions written per (type, topic)
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
    seed: int = 0
    batch_size: int = 8
    backend: str = "hf"  # "hf" (transformers generate), "hf-static" (static cache, compiled on CUDA), "vllm"
    tensor_parallel_size: int = 1  # GPUs vLLM splits the model over (backend "vllm" only)
    restart: bool = False  # discard this stage's earlier results instead of resuming


@dataclass(frozen=True)
class RedTeamType:
    id: str
    name: str
    description: str
    seed_topics: tuple[str, ...]
    seed_questions: tuple[str, ...]


def load_red_team_types(path: str | Path) -> list[RedTeamType]:
    entries = read_yaml(path).get("types")
    if not entries:
        raise PromptFileError(f"{path}: expected a top-level 'types:' list")
    types, seen = [], set()
    for number, entry in enumerate(entries, 1):
        missing = [k for k in ("id", "name", "description", "seed_topics", "seed_questions") if not entry.get(k)]
        if missing:
            raise PromptFileError(f"{path}: type #{number} ({entry.get('id', '?')}) lacks {', '.join(missing)}")
        if entry["id"] in seen:
            raise PromptFileError(f"{path}: type id {entry['id']!r} appears twice")
        seen.add(entry["id"])
        types.append(RedTeamType(entry["id"], entry["name"], entry["description"],
                                 tuple(entry["seed_topics"]), tuple(entry["seed_questions"])))
    return types


def load_templates(path: str | Path) -> dict[str, str]:
    templates = read_yaml(path)
    check_templates(path, templates, {"self_instruct": ["{examples}", "{next}"],
                                      "topics": ["{examples}", "{next}", "{name}"],
                                      "questions": ["{examples}", "{topic}", "{name}"]})
    return templates


def parse_numbered_list(completion: str, cut_off: bool) -> list[str]:
    """Items of a numbered list whose first item's number is in the prompt ("...\n4.").

    The numbers the model writes are not trusted, only the layout.
    A line that is not numbered continues the current item; a blank line ends the list, since what
    follows is the model wandering off. When generation was cut off, the last item is incomplete.
    """
    items: list[str] = []
    current = [completion.split("\n", 1)[0]]
    for line in completion.split("\n")[1:]:
        match = _ITEM.match(line)
        if match:
            items.append(" ".join(current))
            current = [match.group(2)]
        elif not line.strip():
            cut_off = False  # the list ended before the cut
            break
        else:
            current.append(line.strip())
    items.append(" ".join(current))
    if cut_off:
        items = items[:-1]
    return [re.sub(r"\s+", " ", item).strip() for item in items if item.strip()]


def filter_reason(text: str, min_words: int, max_words: int) -> str | None:
    """Why a candidate prompt is unusable, or None."""
    words = len(text.split())
    if words < min_words:
        return f"fewer than {min_words} words"
    if words > max_words:
        return f"more than {max_words} words"
    found = _NON_TEXT.search(text)
    if found:
        return f"non-text task ({found.group(1).lower()})"
    if not text[0].isascii() or not text[0].isalnum():
        return "does not start with a letter or digit"
    return None


def run(config: PromptsConfig, loaded=None, engine: Engine | None = None) -> dict:
    """Write the stage's prompts; resume where an earlier run stopped. Returns the manifest.

    `loaded` reuses a loaded model; `engine` replaces the model altogether (tests use a scripted one).
    """
    stage = Run(config.run, config.runs_dir).stage(STAGE)
    stage.start(settings_of(config), restart=config.restart)
    seeds = _usable_seeds(config)
    types = load_red_team_types(config.types)[: config.types_limit or None]
    templates = load_templates(config.templates)
    if engine is None:
        engine = engine_for(config, loaded)

    with stage.writer("calls.jsonl", "generation/1") as calls, \
            stage.writer("prompts.jsonl", "prompt/1") as prompts, \
            stage.writer("drops.jsonl", "drop/1") as drops, \
            stage.writer("topics.jsonl", "topic/1") as topics_file:
        done = {r["id"]: r for r in stage.read("calls.jsonl")}

        def complete(items, params):
            def record(key, text, completion):
                done[key] = generation_record(key, text, completion,
                                              provenance(config.model, params.to_dict(), config.seed))
                return done[key]
            generate_into(calls, items, engine, params, record)
            return [done[key] for key, _ in items]

        kept = [s["prompt"] for s in seeds]  # what new prompts must not near-duplicate
        self_instruct = _self_instruct(config, seeds, templates, kept, complete, prompts, drops)
        topics = _brainstorm(config, types, templates, complete, topics_file, drops)
        red_team = _red_team(config, types, topics, templates, kept, complete, prompts, drops)
        reasons = drop_reasons(stage.read("drops.jsonl"))

    counts = {"self_instruct": self_instruct, "red_team": red_team, "topics": sum(map(len, topics.values())),
              "model_calls": len(done), "drops": reasons}
    short = []
    if self_instruct < config.n_self_instruct:
        short.append(f"Self-Instruct kept {self_instruct} of {config.n_self_instruct} after {config.max_rounds} rounds")
    thin = [t for t, found in topics.items() if len(found) < config.topics_per_type]
    if thin:
        short.append(f"{len(thin)} types got fewer than {config.topics_per_type} topics: {', '.join(thin)}")
    counts["shortfalls"] = short
    for line in short:
        print(f"[prompts] stopped short: {line} (raise max_rounds, or see drops.jsonl for why)")
    stage.finish(counts)
    return stage.manifest()


def _usable_seeds(config) -> list[dict]:
    seeds = load_prompts(config.seeds)
    usable = [s for s in seeds if filter_reason(s["prompt"], config.min_words, config.max_words) is None]
    if len(usable) < max(config.k_seeds, 1):
        raise PromptFileError(f"{config.seeds}: {len(usable)} usable seed prompts (of {len(seeds)}); "
                              f"need at least k_seeds={config.k_seeds} of {config.min_words}-{config.max_words} words")
    return usable


def _numbered(items: list[str]) -> str:
    return "\n".join(f"{i}. {item}" for i, item in enumerate(items, 1))


def _keep(candidates, kept, config, prompts, drops, extra, limit=None) -> list[dict]:
    """Filter (id, text, fields) candidates; write the kept and the dropped; return the kept.

    Past `limit` kept prompts, the rest are dropped as surplus rather than kept."""
    clean = []
    for key, text, fields in candidates:
        reason = filter_reason(text, config.min_words, config.max_words)
        if reason:
            drops.write({"id": key, "reason": reason, "text": text, **fields})
        else:
            clean.append((key, text, fields))
    survivors = set(rouge_l_filter([text for _, text, _ in clean], config.rouge_threshold, existing=kept))
    result = []
    for index, (key, text, fields) in enumerate(clean):
        if index not in survivors:
            drops.write({"id": key, "reason": f"near-duplicate (ROUGE-L >= {config.rouge_threshold})",
                         "text": text, **fields})
            continue
        if limit is not None and len(result) >= limit:
            drops.write({"id": key, "reason": "target reached", "text": text, **fields})
            continue
        row = {"id": key, "prompt": text, **fields, "provenance": extra}
        prompts.write(row)
        kept.append(text)
        result.append(row)
    return result


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
            text = templates["self_instruct"].format(examples=_numbered([s["prompt"] for s in shown]),
                                                     next=len(shown) + 1)
            calls.append((f"si-{round_}-{j}", text, [s["id"] for s in shown]))
        candidates = []
        for (key, _, shown), call in zip(calls, complete([(k, t) for k, t, _ in calls], params)):
            items = parse_numbered_list(call["completion"], call["finish_reason"] == "length")
            if not items:
                drops.write({"id": key, "reason": "no list item in the model's output", "text": call["completion"]})
            candidates += [(f"{key}-{m}", item, {"source": "self_instruct", "type": None, "topic": None,
                                                 "seeds": shown, "call": key}) for m, item in enumerate(items)]
        generated += _keep(candidates, kept, config, prompts, drops, source,
                           limit=config.n_self_instruct - len(generated))
    return len(generated)


def _clean_topic(item: str) -> str:
    return item.strip().strip("\"'*.,;:- ").strip()


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
            shown = list(t.seed_topics) + found[t.id]
            text = templates["topics"].format(name=t.name, description=t.description,
                                              examples=_numbered(shown), next=len(shown) + 1)
            calls.append((f"topics-{t.id}-{round_}", text))
        for t, (key, _), call in zip(need, calls, complete(calls, params)):
            seen = {s.lower() for s in t.seed_topics} | {s.lower() for s in found[t.id]}
            for m, item in enumerate(parse_numbered_list(call["completion"], call["finish_reason"] == "length")):
                topic = _clean_topic(item)
                words = len(topic.split())
                reason = ("not a short noun phrase" if not 1 <= words <= 6 or topic.endswith("?") else
                          "repeated topic" if topic.lower() in seen else
                          "type has enough topics" if len(found[t.id]) >= config.topics_per_type else None)
                if reason:
                    drops.write({"id": f"{key}-{m}", "reason": reason, "text": item, "type": t.id})
                    continue
                seen.add(topic.lower())
                topics_file.write({"id": f"{t.id}-{len(found[t.id])}", "type": t.id, "topic": topic, "call": key})
                found[t.id].append(topic)
    return found


def _example_pairs(t: RedTeamType) -> list[tuple[str, str]]:
    # Each seed question is shown under the seed topic it shares most words with.
    def overlap(topic, question):
        return len(set(re.findall(r"\w+", topic.lower())) & set(re.findall(r"\w+", question.lower())))
    return [(max(t.seed_topics, key=lambda topic: overlap(topic, q)), q) for q in t.seed_questions]


def _red_team(config, types, topics, templates, kept, complete, prompts, drops) -> int:
    params = SamplingParams(temperature=config.temperature, top_p=config.question_top_p,
                            max_new_tokens=config.question_max_new_tokens, stop=("\nTopic:", "\n\n"),
                            seed=config.seed)
    source = provenance(config.model, params.to_dict(), config.seed)
    calls, fields = [], {}
    for t in types:
        pairs = _example_pairs(t)
        examples = "\n\n".join(f"Topic: {topic}\nQuestion: {question}" for topic, question in pairs)
        for ti, topic in enumerate(topics[t.id]):
            text = templates["questions"].format(name=t.name, description=t.description, examples=examples,
                                                 topic=topic)
            for j in range(config.n_per_topic):
                key = f"rt-{t.id}-{ti}-{j}"
                calls.append((key, text))
                fields[key] = {"source": "red_team", "type": t.id, "topic": topic,
                               "seeds": [q for _, q in pairs], "call": key}
    candidates = []
    for (key, _), call in zip(calls, complete(calls, params)):
        question = call["completion"].strip().split("\n")[0].strip()
        if call["finish_reason"] == "length" and not question.endswith(("?", ".")):
            drops.write({"id": key, "reason": "cut off", "text": question, **fields[key]})
            continue
        candidates.append((key, question, fields[key]))
    return len(_keep(candidates, kept, config, prompts, drops, source))



def tables(run_name: str, runs_dir: str = "runs") -> dict:
    """The stage's prompts, topics and drops as pandas DataFrames, for notebooks and reports."""
    return stage_frames(Run(run_name, runs_dir).stage(STAGE), {
        "prompts": ["id", "prompt", "source", "type", "topic", "seeds", "call"],
        "topics": ["id", "type", "topic", "call"], "drops": ["id", "reason", "text", "source", "type"]})


def plot_prompts_per_type(prompts, ax=None):
    """Horizontal bars: kept prompts per red-team type, with Self-Instruct as one more bar."""
    import matplotlib.pyplot as plt

    labels = prompts["type"].fillna("(self-instruct)") if len(prompts) else prompts.get("type", [])
    counts = labels.value_counts().sort_values() if len(prompts) else []
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 0.25 * max(len(counts), 4) + 1))
    if len(counts):
        counts.plot.barh(ax=ax, color=["#999" if k == "(self-instruct)" else "#3a7" for k in counts.index])
    ax.set_xlabel("kept prompts")
    ax.set_title("Stage 1 prompts by source and red-team type")
    return ax
