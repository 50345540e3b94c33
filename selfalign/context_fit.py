"""Whether a run's prompts fit its model's context, counted before anything runs (the dry run).

For each generating stage: its longest prompt in the model's own tokens (with the BOS token, as the
engine adds it) plus the new tokens it asks for, against the model's context
(`max_position_embeddings` in config.json); for the training of stages 3 and 4, the cutoff against
the context. The prompts are rendered by the stages' own renderers. What the data decides is bounded:

- a user's query (stage 2, the baseline, stage 4's teacher, evaluation's Vicuna questions) counts as
  `QUERY_TOKENS` = 200 tokens: stage 1 keeps prompts of at most `max_words` = 150 words, about 200
  LLaMA tokens. Where the settings name the file (stage 2's or the baseline's `prompts`, the
  Vicuna questions in `data_dir`), its longest prompt is measured instead;
- stage 1's requests show the longest seeds (Self-Instruct: k_seeds + k_generated of them, standing
  in for the generated prompts too) and each red-team type's longest seed topic (standing in for
  the brainstormed ones, which are at most topic_max_words words). A Self-Instruct request is a
  random sample of seeds, and the stage drops one too long for the context and makes the others:
  when the longest seeds do not fit but median ones do, the row says `some` and is not refused;
- training examples longer than the cutoff are dropped or truncated by stages 3-4 themselves, and
  evaluation's scored contexts (TruthfulQA, HHH) depend on the data: neither is counted here.

`read_model` reads a model's config.json and tokenizer only, never its weights; `check` builds the
table for resolved stage settings. This module loads no model and writes nothing (a hub id read
from a reachable hub lands in the hub's own cache).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from .chat_format import ChatFormat, read_instruction
from .evals import load_vicuna_questions
from .inputs import load_prompts
from .models import KNOWN_MODELS, TINY_LLAMA, TINY_RANDOM, context_length, converted_dir, is_prepared
from .principles import load_principle_set, render_prompt
from .public_data import DataError, seeds_path
from .red_team import example_pairs, filter_reason, load_red_team_types, load_templates
from .stages import prompts as stage_one
from .stages.evaluate import data_files

QUERY_TOKENS = 200  # a user's query, where the data is not at hand (see the module's docstring)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")  # one of them holds the vocabulary


class ModelFilesError(ValueError):
    """A model directory whose config or tokenizer is missing or unusable; the message names the file."""


class NotReadable(Exception):
    """A model whose files are not on this machine (a placeholder path, a hub out of reach): the
    dry run says that prompt lengths were not checked, and why."""


class ContextError(ValueError):
    """Prompts that do not fit the model's context; the message names each stage and its numbers."""


@dataclass
class ModelFiles:
    """What the dry run reads of a model: where from, its config and its tokenizer."""

    name: str
    source: str  # the directory or hub id read
    config: object  # a transformers config
    tokenizer: object
    bos_prefix: str = ""  # put before every prompt where the engine does (models that need a BOS the tokenizer omits)
    warnings: list[str] = field(default_factory=list)

    @property
    def context(self) -> int:
        return context_length(self.config)  # as the engine reads it

    def count(self, text: str) -> int:
        """Tokens of a prompt as the engine encodes it (BOS included where the tokenizer adds one)."""
        return len(self.tokenizer(self.bos_prefix + text)["input_ids"])

    def count_many(self, texts: list[str]) -> list[int]:
        """Tokens of continuations (no BOS), tokenized in one call."""
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []


def read_model(name: str) -> ModelFiles:
    """The config and tokenizer of a registered name (prepared), a model directory or a hub id.

    ModelFilesError (one line naming the file) for a directory without config.json, without a
    tokenizer, or whose LLaMA tokenizer has no BOS token (refused: every LLaMA prompt starts with
    one, and without it the counts and the answers would both be off; a LLaMA tokenizer that has
    one but does not add it is a warning in `warnings`, since the engine adds what the tokenizer
    adds); NotReadable for a model
    that is not here to read: tiny-random (built in memory), an unprepared registered model, a
    path that does not exist, a hub id the hub cannot be reached for."""
    if name == TINY_RANDOM:
        raise NotReadable("tiny-random is built in memory (a byte-level tokenizer and 8,192 positions)")
    if name == TINY_LLAMA or name in KNOWN_MODELS:
        where = converted_dir(name)
        if not is_prepared(name):
            raise NotReadable(f"{name} is not prepared in {where} (`selfalign model prepare --name {name}`)")
        return _read_directory(name, where)
    local = Path(name).expanduser()
    if local.exists():
        return _read_directory(name, local)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise NotReadable(f"model {name!r} is not a directory on this machine (pass -p model DIR, or a hub id)")
    return _read_hub(name)


def _read_directory(name: str, where: Path) -> ModelFiles:
    from transformers import AutoConfig, AutoTokenizer

    if not where.is_dir():
        raise ModelFilesError(f"{where}: not a model directory (a folder with config.json and a tokenizer)")
    if not (where / "config.json").is_file():
        raise ModelFilesError(f"{where / 'config.json'} does not exist: {where} is not a Hugging Face model directory")
    if not any((where / file).is_file() for file in TOKENIZER_FILES):
        raise ModelFilesError(f"{where} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    try:
        config = AutoConfig.from_pretrained(where)
    except Exception as error:  # transformers raises several kinds, each for a broken file
        raise ModelFilesError(f"{where / 'config.json'}: cannot be read ({_first_line(error)})") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
    except Exception as error:
        raise ModelFilesError(f"{where}: its tokenizer cannot be read ({_first_line(error)})") from None
    tokenizer_file = next(where / f for f in ("tokenizer_config.json", *TOKENIZER_FILES) if (where / f).is_file())
    return _checked(ModelFiles(name, str(where), config, tokenizer), tokenizer_file)


def _read_hub(name: str) -> ModelFiles:
    from transformers import AutoConfig, AutoTokenizer

    try:  # the local hub cache first: no network, and no retries
        return _checked(ModelFiles(name, name, AutoConfig.from_pretrained(name, local_files_only=True),
                                   AutoTokenizer.from_pretrained(name, local_files_only=True)), name)
    except Exception:
        pass
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:  # transformers retries an unreachable hub for half a minute; a socket says so in seconds
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
            raise OSError("HF_HUB_OFFLINE is set")
        socket.create_connection((host, port), timeout=5).close()
        return _checked(ModelFiles(name, name, AutoConfig.from_pretrained(name), AutoTokenizer.from_pretrained(name)),
                        name)
    except Exception as error:
        raise NotReadable(f"hub id {name!r} cannot be read here ({host}: {_first_line(error)}); pass the model's "
                          "directory (-p model DIR)") from None


def _checked(files: ModelFiles, tokenizer_file) -> ModelFiles:
    tokenizer, config = files.tokenizer, files.config
    llama = getattr(config, "model_type", "") == "llama"
    if llama and tokenizer.bos_token is None:
        raise ModelFilesError(f"{tokenizer_file}: the tokenizer has no BOS token, which a LLaMA model expects at the "
                              "start of every prompt")
    adds_bos = tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
    if files.name in KNOWN_MODELS:  # the registry knows which of its models need a BOS put in
        files.bos_prefix = tokenizer.bos_token if KNOWN_MODELS[files.name].requires_bos and not adds_bos else ""
    elif llama and not adds_bos:  # a LLaMA directory whose tokenizer leaves the BOS out: allowed, but said
        files.warnings.append(f"{tokenizer_file}: the tokenizer does not add its BOS token {tokenizer.bos_token!r}; "
                              "the counts have none, as the prompts will, and a LLaMA model answers worse without it")
    if getattr(config, "max_position_embeddings", None) is None:
        files.warnings.append(f"{files.source}: config.json has no max_position_embeddings; the engine assumes "
                              f"{files.context} positions")
    return files


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ---- one function a stage: rows of (what, prompt tokens, new tokens) --------------------------------

def _row(stage: str, what: str, prompt_tokens: int, new_tokens: int, model: ModelFiles, typical: int = 0) -> dict:
    """One prompt kind of a stage. `typical`: for a sampled request, the prompt tokens of a typical
    sample; when that fits but the longest does not, the stage drops a rare request (`some`)."""
    needs = prompt_tokens + new_tokens
    return {"stage": stage, "what": what, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "needs": needs,
            "context": model.context, "fits": needs <= model.context,
            "some": needs > model.context and 0 < typical and typical + new_tokens <= model.context,
            "typical_tokens": typical or None, "model": model.name}


def _longest_first(model: ModelFiles, items: list, text=lambda item: item) -> list:
    """`items` ordered by the tokens of `text(item)`, the longest first."""
    lengths = model.count_many([text(item) for item in items])
    return [item for _, item in sorted(zip(lengths, items), key=lambda pair: -pair[0])]


def prompts_rows(config, model: ModelFiles, notes: list[str]) -> list[dict]:
    """Stage 1's three requests: a Self-Instruct list, a topic brainstorm, a question request."""
    rows = []
    templates = load_templates(config.templates)
    types = load_red_team_types(config.types)[: config.types_limit or None]
    try:
        seeds = [s["prompt"] for s in load_prompts(seeds_path(config.seeds))
                 if filter_reason(s["prompt"], config.min_words, config.max_words) is None]
    except (OSError, ValueError, DataError) as error:
        notes.append(f"prompts: the Self-Instruct request was not checked ({_first_line(error)})")
    else:
        # A request shows a random sample of seeds; the longest together are its worst case. The
        # stage drops a request too long for the context and makes the others, so a worst case over
        # the context while a sample of median seeds fits means a few requests dropped, not a refusal.
        ordered, k = _longest_first(model, seeds), config.k_seeds + config.k_generated
        median = ordered[max(len(ordered) // 2 - k // 2, 0):][:k]
        rows.append(_row("prompts", f"Self-Instruct list of the {k} longest seeds",
                         model.count(stage_one.self_instruct_request(templates, ordered[:k])),
                         config.list_max_new_tokens, model,
                         typical=model.count(stage_one.self_instruct_request(templates, median))))
    if not types:
        return rows
    seed_topics = {t.id: _longest_first(model, list(t.seed_topics)) for t in types}
    longest_topic = {t.id: seed_topics[t.id][0] for t in types}
    brainstorm = []
    for t in types:
        # What a brainstorm shows: topics_shown (0: all) of the seed topics and the up to
        # topics_per_type - 1 found so far, each found one counted as the type's longest seed topic.
        pool = seed_topics[t.id] + [longest_topic[t.id]] * max(config.topics_per_type - 1, 0)
        shown = pool[: config.topics_shown] if 0 < config.topics_shown < len(pool) else pool
        brainstorm.append(model.count(stage_one.topics_request(templates, t, shown)))
    rows.append(_row("prompts", "topic brainstorm of the longest type", max(brainstorm), config.topic_max_new_tokens,
                     model))
    if config.red_team_scheme == "mixed":
        examples = _longest_first(model, [(t, topic, question) for t in types for topic, question in example_pairs(t)],
                                  lambda e: f"{e[0].name} {e[1]} {e[2]}")
        hints = _longest_first(model, [(t, longest_topic[t.id]) for t in types], lambda h: f"{h[0].name} {h[1]}")
        text = stage_one.mixed_request(templates, examples[: config.k_seed_questions],
                                       hints[: config.questions_per_request])
        # One question's budget a hint, as the stage asks (prompts._mixed_questions).
        rows.append(_row("prompts", f"question request ({config.questions_per_request} hints, mixed)",
                         model.count(text), config.question_max_new_tokens * config.questions_per_request, model))
    else:
        longest = max(model.count(stage_one.questions_request(templates, t, longest_topic[t.id])) for t in types)
        rows.append(_row("prompts", "question request of the longest type", longest, config.question_max_new_tokens,
                         model))
    return rows


def self_align_rows(config, model: ModelFiles, notes: list[str]) -> list[dict]:
    """Stage 2: the principles, the exemplars and a query, as `principles.render_prompt` renders them,
    counted as the engine counts them: the tokens of the whole prompt (generation/hf.py)."""
    principle_set = load_principle_set(config.principles, config.exemplars, config.template)
    if config.prompts:
        queries = [q["prompt"] for q in load_prompts(config.prompts)[: config.limit or None]]
        # A prompt file can hold the paper's 360k prompts, each behind the same ~1,500-token prefix:
        # the queries are ranked by their own tokens, and the longest few are counted whole.
        longest = _longest_first(model, queries)[:64]
        tokens = max(model.count(render_prompt(principle_set, q, config.assistant)) for q in longest)
        what = f"principles, exemplars and the longest of {len(queries)} prompts"
    else:
        tokens = model.count(render_prompt(principle_set, "", config.assistant)) + QUERY_TOKENS
        what = f"principles, exemplars and a {QUERY_TOKENS}-token query"
    return [_row("self-align", what, tokens, config.max_new_tokens, model)]


def baseline_rows(config, model: ModelFiles, notes: list[str]) -> list[dict]:
    if config.prompts:
        queries = load_prompts(config.prompts)[: config.limit or None]
        texts = [config.template.format(prompt=q["prompt"]) for q in queries]
        what, tokens = f"the longest of {len(texts)} prompts", max(model.count(t) for t in texts)
    else:
        what, tokens = f"a {QUERY_TOKENS}-token query", model.count(config.template.format(prompt="")) + QUERY_TOKENS
    return [_row("baseline", what, tokens, config.max_new_tokens, model)]


def engrave_rows(config, model: ModelFiles, notes: list[str]) -> list[dict]:
    return [_row("engrave", "a training example at the cutoff", config.cutoff, 0, model)]


def verbose_rows(config, model: ModelFiles, notes: list[str], chat: ChatFormat) -> list[dict]:
    """Stage 4: the teacher's prompt (the chat format with the verbose instruction), then training."""
    teacher = model.count(chat.prompt("", instruction=read_instruction(config.instruction))) + QUERY_TOKENS
    return [_row("verbose", f"teacher: overview, instruction and a {QUERY_TOKENS}-token query", teacher,
                 config.max_new_tokens, model),
            _row("verbose", "a training example at the cutoff", config.cutoff, 0, model)]


def evaluate_rows(config, model: ModelFiles, notes: list[str], chat: ChatFormat) -> list[dict]:
    """Evaluation's Vicuna answers; its scored contexts (TruthfulQA, HHH) depend on the data."""
    notes.append("evaluate: the contexts it scores (TruthfulQA, HHH) depend on the data and are not counted")
    if "vicuna" not in config.benchmarks:
        return []
    try:
        questions = [q["question"] for q in load_vicuna_questions(data_files(config.data_dir)["vicuna"])]
    except (OSError, ValueError):
        questions = []
    if questions:
        what, tokens = f"Vicuna answer, the longest of {len(questions)} questions", max(
            model.count(chat.prompt(q)) for q in questions)
    else:
        what, tokens = f"Vicuna answer to a {QUERY_TOKENS}-token question", model.count(chat.prompt("")) + QUERY_TOKENS
    return [_row("evaluate", what, tokens, config.max_new_tokens, model)]


@dataclass
class Fit:
    rows: list[dict]  # one per prompt kind of each stage
    notes: list[str]  # what was not checked, and why; warnings about the model's files
    models: dict  # model name -> ModelFiles, for those that were read

    def misfits(self) -> list[dict]:
        """The rows that cannot fit: over the context, and not a sample that usually fits."""
        return [row for row in self.rows if not row["fits"] and not row["some"]]

    def text(self) -> str:
        """The table and the notes, as the dry run prints them."""
        lines = []
        for name, files in self.models.items():
            where = name if files.source == name else f"{name} ({files.source})"
            lines.append(f"prompt lengths in the tokens of {where}, against its context of {files.context} positions:")
            lines.append(f"  {'stage':11} {'prompt':>6} {'+ new':>6} {'= needs':>8} {'context':>8}  fits  what")
            for row in (r for r in self.rows if r["model"] == name):
                fits = "yes" if row["fits"] else "some" if row["some"] else "NO"
                lines.append(f"  {row['stage']:11} {row['prompt_tokens']:6} {row['new_tokens']:6} {row['needs']:8} "
                             f"{row['context']:8}  {fits:4}  {row['what']}")
        some = [f"{r['stage']}: {r['what']} needs {r['needs']}, over the context, but a typical one needs "
                f"{r['typical_tokens'] + r['new_tokens']}: the stage drops the rare request too long and makes the "
                "others" for r in self.rows if r["some"]]
        return "\n".join(lines + some + self.notes)

    def refuse(self) -> None:
        """ContextError naming every stage whose prompt and new tokens exceed the context."""
        bad = self.misfits()
        if bad:
            raise ContextError("prompts do not fit the model's context: " + "; ".join(
                f"stage {r['stage']} ({r['what']}): {r['prompt_tokens']} prompt tokens + {r['new_tokens']} new = "
                f"{r['needs']} > {r['context']} positions of {r['model']}" for r in bad))


def check(stages: dict) -> Fit:
    """The fit table of resolved stage settings ({stage name: its settings dataclass}, as
    `profiles.resolve` gives them): each stage counted with its own `model`'s tokenizer."""
    rows, notes, models = [], [], {}
    chat = ChatFormat.load(stages["engrave"].template) if "engrave" in stages else ChatFormat.load()
    unreadable = {}
    for name, config in stages.items():
        model = config.model
        if model not in models and model not in unreadable:
            try:
                models[model] = read_model(model)
                notes += models[model].warnings
            except NotReadable as why:
                unreadable[model] = str(why)
        if model in unreadable:
            continue
        extra = (chat,) if name in ("verbose", "evaluate") else ()
        rows += ROWS[name](config, models[model], notes, *extra)
    for model, why in unreadable.items():
        names = [name for name, config in stages.items() if config.model == model]
        notes.insert(0, f"prompt lengths not checked for {', '.join(names)}: {why}")
    return Fit(rows, notes, models)


ROWS = {"prompts": prompts_rows, "self-align": self_align_rows, "baseline": baseline_rows, "engrave": engrave_rows,
        "verbose": verbose_rows, "evaluate": evaluate_rows}
