"""Stage 2: principle-driven self-alignment. The base model answers each prompt under principles.

Every stage-1 prompt is put after the same prefix (preamble, 16 principles, 5 exemplars whose
assistant thinks aloud and names the rules it follows) and the model continues after
"<Name> (internal thoughts):". Its continuation is split into thoughts and answer
(`selfalign.principles.parse_response`); the principles the thoughts cite are the triggers.
The prefix is identical for every query, so its key/value cache is computed once.

A response is dropped, with its reason, when it has no answer marker or no thoughts, runs into
max_new_tokens before the answer ended, is empty or too short, copies phrases peculiar to an exemplar or the closing exchange, opens with a blanket
refusal, opens with any apology (`drop_apologies`, as Dromedary's filter does), or (if asked) cites
principles the set lacks. `suppress` pushes down the first token of texts such as "Sorry" while
sampling, as Dromedary's logit bias did. An answer that starts repeating itself is cut
before the first repeated sentence and kept. A prompt too long for the model's context is dropped
unanswered. Nothing is lost silently: raw continuations are in calls.jsonl, kept ones in
responses.jsonl, the rest in drops.jsonl. A resume refuses a prompt whose text changed under its id.

Reads: `runs/<run>/prompts/prompts.jsonl` (of a finished stage 1, or any prompt file) and `principles/`.
Writes: `runs/<run>/self_align/` calls.jsonl, responses.jsonl (schema response/1), drops.jsonl.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..dedup import rouge_l_fmeasure
from ..generation import Engine, SamplingParams, engine_for
from ..config import GenerationSettings
from ..principles import PrincipleSet, load_principle_set, parse_response, render_prefix, render_prompt
from ..inputs import PRINCIPLES_DIR, load_prompts
from ..records import Run, provenance
from .common import (check_backend, check_model, check_ranges, check_resume, drop_reasons, generate_into,
                     generation_record, settings_of, stage_frames, stage_one_prompts)

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

    def __post_init__(self):
        check_ranges(self, non_negative=("limit", "temperature", "min_answer_words"),
                     positive=("max_new_tokens", "batch_size", "tensor_parallel_size"), probabilities=("top_p",))
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


def sampling(config) -> SamplingParams:
    # Dromedary pushed "Sorry" down by 100 logits, so that answers do not open with an apology.
    return SamplingParams(temperature=config.temperature, top_p=config.top_p, max_new_tokens=config.max_new_tokens,
                          stop=("\nUser:",), seed=config.seed, logit_bias=tuple((text, -100.0) for text in config.suppress))


def run(config: SelfAlignConfig, loaded=None, engine: Engine | None = None) -> dict:
    """Answer the prompts under the principles; resume where an earlier run stopped."""
    run_dir = Run(config.run, config.runs_dir)
    stage = run_dir.stage(STAGE)
    # Everything that can fail without generating fails here, before the manifest records settings.
    principle_set = load_principle_set(config.principles, config.exemplars, config.template)
    settings = {**settings_of(config), "principles_hash": principle_set.hash}  # an edited principle is a new setting
    prompts = load_prompts(config.prompts or stage_one_prompts(run_dir))[: config.limit or None]
    params = sampling(config)
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

        def settle(key: str, completion: str, finish_reason: str, tokens: int) -> None:
            row = source[key]
            parsed = parse_response(principle_set, completion, config.assistant)
            reason = drop_reason(parsed, finish_reason, row["prompt"], principle_set, config)
            fields = {"id": key, "prompt": row["prompt"], "type": row.get("type"), "topic": row.get("topic"),
                      "source": row.get("source"), "thoughts": parsed.thoughts, "answer": parsed.answer,
                      "triggers": parsed.triggers, "unknown_citations": parsed.unknown_citations,
                      "cut_at_repeat": parsed.cut_at_repeat, "finish_reason": finish_reason,
                      "completion_tokens": tokens, "provenance": origin}
            if reason:
                drops.write({**fields, "reason": reason, "raw": completion})
            else:
                responses.write(fields)

        def record(key, text, completion):
            settle(key, completion.text, completion.finish_reason, completion.completion_tokens)
            return generation_record(key, source[key]["prompt"], completion, origin)

        def drop_fields(key):
            row = source[key]
            return {"prompt": row["prompt"], "type": row.get("type"), "topic": row.get("topic"),
                    "source": row.get("source")}

        generate_into(calls, items, engine, params, record, render_prefix(principle_set, config.assistant),
                      drops=drops, drop_fields=drop_fields, prompts=stored)
        # A kill between a call's record and its parsed record leaves it unsettled: settle it now.
        for call in stage.read("calls.jsonl"):
            if call["id"] not in responses and call["id"] not in drops and call["id"] in source:
                settle(call["id"], call["completion"], call["finish_reason"], call["completion_tokens"])
        kept, dropped = len(responses), len(drops)
        reasons = drop_reasons(stage.read("drops.jsonl"))

    stage.finish({"prompts": len(prompts), "responses": kept, "drops": dropped, "drop_reasons": reasons})
    return stage.manifest()


def tables(run: str, runs_dir: str = "runs") -> dict:
    """The stage's responses and drops as pandas DataFrames."""
    columns = ["id", "prompt", "type", "topic", "source", "thoughts", "answer", "triggers", "unknown_citations"]
    return stage_frames(Run(run, runs_dir).stage(STAGE),
                        {"responses": columns, "drops": columns + ["reason", "raw"]})


def trigger_stats(responses, principle_set: PrincipleSet):
    """(overall, per_type): how often each principle fired, overall and by red-team type.

    overall: one row per principle with the count and the share of responses citing it.
    per_type: principles x types, the share of that type's responses citing each principle.
    """
    import pandas as pd

    labels = {p.number: f"{p.number} {p.name}" for p in principle_set.principles}
    rows = []
    for _, response in responses.iterrows():
        kind = response.get("type") or "(self-instruct)"
        for number in response["triggers"]:
            rows.append({"principle": labels.get(number, str(number)), "type": kind, "id": response["id"]})
    fired = pd.DataFrame(rows, columns=["principle", "type", "id"])
    counts = fired["principle"].value_counts().reindex(list(labels.values()), fill_value=0)
    overall = pd.DataFrame({"responses": counts, "share": counts / max(len(responses), 1)})
    sizes = responses["type"].fillna("(self-instruct)").value_counts().sort_index() if len(responses) else pd.Series()
    # Every type with responses gets a column, even where nothing fired: a zero is a finding.
    per_type = (pd.crosstab(fired["principle"], fired["type"])
                .reindex(index=list(labels.values()), columns=sizes.index, fill_value=0))
    per_type = per_type.div(sizes, axis=1).fillna(0.0)
    return overall, per_type


def plot_trigger_heatmap(per_type, ax=None):
    """Heatmap of the per-type trigger shares from `trigger_stats`."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(0.45 * max(per_type.shape[1], 4) + 3, 0.35 * per_type.shape[0] + 2))
    if per_type.shape[1] == 0:
        ax.text(0.5, 0.5, "no responses", ha="center", va="center", transform=ax.transAxes)
        return ax
    image = ax.imshow(per_type.to_numpy(dtype=float), aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(per_type.shape[1]), per_type.columns, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(per_type.shape[0]), per_type.index, fontsize=8)
    ax.figure.colorbar(image, ax=ax, label="share of responses citing the principle")
    ax.set_title("Which principles fired, by red-team type")
    return ax


def plot_answer_lengths(responses, ax=None):
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3))
    words = responses["answer"].str.split().str.len() if len(responses) else []
    ax.hist(words, bins=20, color="#3a7")
    ax.set_xlabel("answer length (words)")
    ax.set_ylabel("responses")
    return ax


def ablate(prompts: list[str], engine: Engine, first: PrincipleSet, second: PrincipleSet, config=None):
    """Answer the same prompts with the same seeds under two principle sets; one row per prompt.

    Columns: prompt, answer_a, answer_b, triggers_a, triggers_b, answer_changed, triggers_changed,
    answer_overlap (ROUGE-L F-measure of the two answers).
    Each prompt is seeded by its index, so differences come from the principles, not the sampling.
    """
    import pandas as pd

    config = config or SelfAlignConfig()
    params = sampling(config)
    keys = [f"ablate-{i}" for i in range(len(prompts))]
    results = {}
    for label, principle_set in (("a", first), ("b", second)):
        texts = [render_prompt(principle_set, p, config.assistant) for p in prompts]
        completions = engine.generate(texts, params, shared_prefix=render_prefix(principle_set, config.assistant),
                                      keys=keys)
        results[label] = [parse_response(principle_set, c.text, config.assistant) for c in completions]
    table = pd.DataFrame({
        "prompt": prompts,
        "answer_a": [p.answer for p in results["a"]], "answer_b": [p.answer for p in results["b"]],
        "triggers_a": [p.triggers for p in results["a"]], "triggers_b": [p.triggers for p in results["b"]],
    })
    table["answer_changed"] = table["answer_a"] != table["answer_b"]
    table["triggers_changed"] = table["triggers_a"] != table["triggers_b"]
    # Any edit to the prompt changes every sampled token after it, so "changed" is nearly always
    # true; the ROUGE-L overlap says how much of the answer survived.
    table["answer_overlap"] = [1.0 if a == b else round(rouge_l_fmeasure(a, b), 3)  # two empty answers agree
                               for a, b in zip(table["answer_a"], table["answer_b"])]
    return table
