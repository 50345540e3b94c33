"""Ablations of the principle set: the same prompts, the same seeds, two or more principle sets.

- `ablate` answers prompts under two sets (the widgets' editor: the original and an edit).
- `leave_one_out` answers prompts with all principles and then without each one in turn (16 + 1
  variants), and `summarise` says, per principle left out, how many responses changed, how much of
  each survived (ROUGE-L against the full set's response: the thoughts, the rules they cite and the
  answer, as far as the answer length allows), how far the likelihood of each citation
  moved (`triggers.principle_scores`), and which red-team type moved most. `run` does this for a
  run's stage-2 prompts (`selfalign leave-one-out`, chapter 6) into `runs/<run>/leave_one_out/`.

Every variant samples as stage 2 does (`self_align.sampling`), under its own format grammar where
stage 2 constrains the format (so it cannot cite the principle it was not shown), and seeds each
prompt by the same key, so that a difference comes from the principles, not from a new draw.
Variants are decoded several at a time, each behind its own prefix (`Engine.generate_groups`), and
each prefix starts from the full set's cache, which it shares up to the principle left out; the
scorer then starts from the variant's cache. A chunk of variants' rows is appended to the JSONL file
as it finishes; a rerun skips what is there and refuses a file made for other prompts, settings or
principles. This module plots but does not decide what the chapter shows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from .config import GenerationSettings, from_mapping
from .dedup import rouge_l_fmeasure
from .generation import engine_for
from .models import load_model
from .principles import PrincipleError, PrincipleSet, load_principle_set, parse_response, render_prefix, render_prompt
from .records import JsonlWriter, Run, RunError, Schema, read_jsonl
from .stages import self_align
from .stages.common import check_backend, check_ranges, check_room, settings_of
from .triggers import SELF_INSTRUCT, principle_scores

STAGE = "leave_one_out"
ROW = Schema("leave_one_out", 1, {"id": str, "key": str, "prompt": str, "response": str, "triggers": list,
                                  "request": dict})
FULL = "all"  # the variant with every principle


@dataclass
class LeaveOneOutConfig(GenerationSettings):
    model: str = ""  # "": the model the run's stage 2 answered with
    # Each variant sits behind its own ~2,500-token prefix, run once for answering and scoring
    # (benchmarks/RESULTS.md times the 17 variants on 2 CPU cores at these sizes).
    loo_prompts: int = 2  # prompts every variant answers: stage 2's kept ones first, one per red-team type first
    # Stage 2's thoughts and citations take 57-107 tokens on the embedded model: 96 reach the answer's start.
    loo_max_new_tokens: int = 96  # per response; the sampling settings are otherwise stage 2's
    loo_principles: tuple[int, ...] = ()  # the principles left out, one at a time; (): every one
    loo_scores: bool = True  # score each answer's principle_scores (the likelihood of citing each principle)
    # Rows decoded together: 9 variants of the book's 2 prompts, so that its 17 variants decode in two
    # batches; at 16 a third one held a single variant and cost 9 s of 64 (benchmarks/RESULTS.md).
    batch_size: int = 18

    def __post_init__(self):
        check_ranges(self, positive=("loo_prompts", "loo_max_new_tokens"))
        check_backend(self.backend)
        try:  # the command line hands the numbers over as text
            self.loo_principles = tuple(int(n) for n in self.loo_principles)
        except (TypeError, ValueError):
            raise ValueError(f"loo_principles must be principle numbers, got {self.loo_principles!r}") from None


def ablate(prompts: list[str], engine, first: PrincipleSet, second: PrincipleSet, config=None):
    """Answer the same prompts with the same seeds under two principle sets; one row per prompt.

    Columns: prompt, answer_a, answer_b, triggers_a, triggers_b, answer_changed, triggers_changed,
    answer_overlap (ROUGE-L F-measure of the two answers). Each prompt is seeded by its index and
    each set decodes under its own grammar, so differences come from the principles, not the sampling.
    """
    import pandas as pd

    config = config or self_align.SelfAlignConfig()
    keys = [f"ablate-{i}" for i in range(len(prompts))]
    answered = _answer_sets([(prompts, keys, first), (prompts, keys, second)], engine, config)
    results = dict(zip("ab", answered))
    table = pd.DataFrame({
        "prompt": prompts,
        "answer_a": [p.answer for _, p in results["a"]], "answer_b": [p.answer for _, p in results["b"]],
        "triggers_a": [p.triggers for _, p in results["a"]], "triggers_b": [p.triggers for _, p in results["b"]],
    })
    return _compared(table)


def _compared(table):
    table["answer_changed"] = table["answer_a"] != table["answer_b"]
    table["triggers_changed"] = table["triggers_a"].map(list) != table["triggers_b"].map(list)
    # Any edit to the prompt changes every sampled token after it, so "changed" is nearly always
    # true; the ROUGE-L overlap says how much of the answer survived.
    table["answer_overlap"] = [overlap(a, b) for a, b in zip(table["answer_a"], table["answer_b"])]
    return table


def overlap(a: str, b: str) -> float:
    """ROUGE-L F-measure of two answers, rounded; two identical (or two empty) answers agree."""
    return 1.0 if a == b else round(rouge_l_fmeasure(a, b), 3)


def _answer_sets(sets, engine, config):
    """[[(completion, parsed)] per prompt] per (prompts, keys, principle set): each set's prompts
    behind its own prefix and grammar, all sets decoded together where the engine can."""
    groups = [([render_prompt(subset, p, config.assistant) for p in prompts], self_align.sampling(config, subset),
               render_prefix(subset, config.assistant), keys) for prompts, keys, subset in sets]
    return [[(c, parse_response(subset, c.text, config.assistant)) for c in completions]
            for (_, _, subset), completions in zip(sets, engine.generate_groups(groups))]


# ---- leave-one-out ----

def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def request_of(prompts: Sequence[dict], principle_set: PrincipleSet, config, scored: bool) -> dict:
    """What a leave-one-out file's rows were made for: digests of the prompts (keys and texts), the
    settings that shape an answer (stage 2's sampling, the model, whether answers were scored),
    and the full principle set's hash."""
    # Stage 2's filters and files do not shape an answer (the files are in the principles' hash).
    settings = {k: v for k, v in settings_of(config).items()
                if k not in ("prompts", "principles", "exemplars", "template", "limit", "min_answer_words",
                             "drop_apologies", "drop_unknown_citations", "score_principles")}
    return {"prompts": _digest([[_key(row, i), row["prompt"]] for i, row in enumerate(prompts)]),
            "settings": _digest({**settings, "scored": scored}), "principles": principle_set.hash}


def _key(row: dict, index: int) -> str:
    return str(row.get("id") or f"loo-{index}")


def _earlier(path: Path, request: dict) -> list[dict]:
    """The rows already in `path`; RunError when they were made for another request."""
    if not path.exists():
        return []
    rows = list(read_jsonl(path))
    differs = sorted({name for row in rows for name in request if row["request"].get(name) != request[name]})
    if differs:
        raise RunError(f"{path} holds leave-one-out answers made for other {' and '.join(differs)} than these "
                       "(its rows would not compare with new ones): delete it, or, for a run, rerun with "
                       "--restart (restart=True) to set it aside, or use another run name")
    return rows


def leave_one_out(prompts: Sequence[dict], engine, principle_set: PrincipleSet, config=None, scorer=None,
                  path: str | Path | None = None, principles: Sequence[int] | None = None, progress: bool = False):
    """Answer `prompts` (records with "prompt", optionally "id" and "type") under the full set and
    without each of `principles` (default: every one) in turn; return (answers, summary).

    `config` holds stage 2's sampling settings (a `SelfAlignConfig`; its max_new_tokens is the
    answers' length). Each prompt is seeded by its record id in every variant. With `scorer`, each
    answer gets its principle_scores. Variants are decoded `engine.batch_size // len(prompts)` at a
    time (`Engine.generate_groups`). With `path`, each chunk's rows are appended to that JSONL file
    when it finishes, and the rows already there are reused (a file made for other prompts,
    settings or principles is refused); `progress` shows a bar over the variants. answers: one row
    per variant and prompt, with its `overlap` with the full set's response; summary:
    `summarise(answers)`.
    """
    config = config or self_align.SelfAlignConfig()
    numbers = list(principles) if principles else [p.number for p in principle_set.principles]
    principle_set.without(*numbers)  # PrincipleError, before anything runs, for a number the set lacks
    if len(set(numbers)) != len(numbers):
        raise PrincipleError(f"principles to leave out repeat: {numbers}")
    keys = [_key(row, i) for i, row in enumerate(prompts)]
    if len(set(keys)) != len(keys):
        raise ValueError("the prompts' ids must be unique")
    request = request_of(prompts, principle_set, config, scorer is not None)
    rows = _earlier(Path(path), request) if path else []
    done = {row["id"] for row in rows}
    todo = []  # (variant, left out, principle set, [(index, prompt row)] not yet answered)
    for number in [None, *numbers]:
        variant = FULL if number is None else f"without {number}"
        rows_left = [(i, row) for i, row in enumerate(prompts) if f"{variant}/{keys[i]}" not in done]
        if rows_left:
            todo.append((variant, number, principle_set if number is None else principle_set.without(number), rows_left))
    # Every variant's prefix starts from the full set's cache (the preamble and the rules before the
    # one left out are the same), run first so that a resumed run branches from it as a whole one does.
    # A chunk is one batch, whose prefixes the backend's store keeps with the full set's, for the scorer.
    per_chunk = max(1, engine.batch_size // len(prompts))
    prepare = getattr(engine.backend, "cache_prefix", None)
    if todo and prepare is not None:
        prepare(render_prefix(principle_set, config.assistant))
    chunks = [todo[start:start + per_chunk] for start in range(0, len(todo), per_chunk)]
    with JsonlWriter(Path(path), ROW) if path else contextlib.nullcontext() as writer, \
            tqdm(total=len(todo), desc="leave-one-out", unit="variant", disable=not progress) as bar:
        for chunk in chunks:
            answered = _answer_sets([([row["prompt"] for _, row in left], [keys[i] for i, _ in left], subset)
                                     for _, _, subset, left in chunk], engine, config)
            for (variant, number, subset, left), answers in zip(chunk, answered):
                scores = [None] * len(left) if scorer is None else principle_scores(
                    scorer, subset, [(row["prompt"], p.thoughts) for (_, row), (_, p) in zip(left, answers)],
                    config.assistant)
                for (i, row), (completion, parsed), score in zip(left, answers, scores):
                    made = {"id": f"{variant}/{keys[i]}", "variant": variant, "left_out": number, "key": keys[i],
                            "prompt": row["prompt"], "type": row.get("type"), "response": completion.text.strip(),
                            "finish_reason": completion.finish_reason,
                            "completion_tokens": completion.completion_tokens, "thoughts": parsed.thoughts,
                            "answer": parsed.answer, "triggers": parsed.triggers,
                            "unknown_citations": parsed.unknown_citations, "principle_scores": score,
                            "request": request}
                    rows.append(made)
                    if writer is not None:
                        writer.write(made)
            bar.update(len(chunk))
    wanted = {FULL, *(f"without {n}" for n in numbers)}
    answers = answer_table([r for r in rows if r["variant"] in wanted and r["key"] in set(keys)], principle_set)
    return answers, summarise(answers, principle_set)


def answer_table(rows: list[dict], principle_set: PrincipleSet):
    """The rows as a DataFrame (full set first, then by principle, prompts in order), each with its
    `overlap` with the full set's response to the same prompt and whether it `changed`. A
    response is the whole continuation: at a short answer length the answer is often cut off
    or not begun, while the thoughts and citations, where the principles act first, are there."""
    import pandas as pd

    columns = ["variant", "left_out", "key", "type", "prompt", "response", "thoughts", "answer", "triggers",
               "unknown_citations", "principle_scores", "finish_reason", "completion_tokens"]
    table = pd.DataFrame(rows, columns=columns)
    table["type"] = table["type"].map(lambda t: t if isinstance(t, str) and t else SELF_INSTRUCT)
    rank = {p.number: i for i, p in enumerate(principle_set.principles)}
    seen = {key: i for i, key in enumerate(dict.fromkeys(table["key"]))}
    table["_o"] = [(-1 if pd.isna(n) else rank.get(int(n), 99), seen[k])
                   for n, k in zip(table["left_out"], table["key"])]
    table = table.sort_values("_o").drop(columns="_o").astype({"left_out": "Int64"})
    full = table[table["variant"] == FULL].set_index("key")
    table["overlap"] = [overlap(full.at[k, "response"], r) if k in full.index else float("nan")
                        for k, r in zip(table["key"], table["response"])]
    table["changed"] = [k in full.index and full.at[k, "response"] != r
                        for k, r in zip(table["key"], table["response"])]
    return table.reset_index(drop=True)


def score_shift(full: dict | None, variant: dict | None) -> float | None:
    """Total-variation distance between the full set's principle_scores, renormalised over the
    principles the variant kept, and the variant's own; None where either is missing."""
    if not isinstance(full, dict) or not isinstance(variant, dict) or sum(full.get(k, 0.0) for k in variant) <= 0:
        return None
    total = sum(full.get(k, 0.0) for k in variant)
    return 0.5 * sum(abs(full.get(k, 0.0) / total - variant[k]) for k in variant)


def summarise(answers, principle_set: PrincipleSet):
    """One row per principle left out, largest effect first: responses `changed` of `n`, the
    `median_overlap` with the full set's responses, `triggers_changed`, the mean `score_shift`
    (None without scores) and `most_moved_type`, the red-team type of lowest mean overlap (None
    when nothing changed). `effect` = 1 - the mean overlap (a median over a few prompts is 1 until
    most of them change), ties broken by the score shift."""
    import pandas as pd

    names = {p.number: p.name for p in principle_set.principles}
    full = answers[answers["variant"] == FULL].set_index("key")
    rows = []
    for number, group in answers[answers["variant"] != FULL].groupby("left_out", sort=True):
        number = int(number)
        before = [full.at[k, "triggers"] if k in full.index else [] for k in group["key"]]
        shifts = [s for s in (score_shift(full.at[k, "principle_scores"] if k in full.index else None, v)
                              for k, v in zip(group["key"], group["principle_scores"])) if s is not None]
        by_type = group.groupby("type")["overlap"].mean().sort_values(kind="stable")
        rows.append({"left_out": number, "principle": f"{number} {names.get(number, '?')}",
                     "changed": int(group["changed"].sum()), "n": len(group),
                     "median_overlap": round(float(group["overlap"].median()), 3),
                     "effect": round(1 - float(group["overlap"].mean()), 3),
                     "triggers_changed": sum(list(a) != list(b) for a, b in zip(before, group["triggers"])),
                     "score_shift": round(sum(shifts) / len(shifts), 4) if shifts else None,
                     "most_moved_type": by_type.index[0] if len(by_type) and by_type.iloc[0] < 1 else None})
    columns = ["left_out", "principle", "changed", "n", "median_overlap", "triggers_changed", "score_shift",
               "most_moved_type", "effect"]
    summary = pd.DataFrame(rows, columns=columns)
    shift = summary["score_shift"].fillna(0.0) if len(summary) else summary["score_shift"]
    return summary.assign(_s=shift).sort_values(["effect", "_s", "left_out"], ascending=[False, False, True],
                                                kind="stable").drop(columns="_s").reset_index(drop=True)


def as_ablation(answers, number: int):
    """The full set against the set without `number`, from leave-one-out answers, as an `ablate`
    table (a: all principles, b: without it; the whole responses), for `widgets.comparison_html`."""
    import pandas as pd

    full = answers[answers["variant"] == FULL].set_index("key")
    without = answers[answers["variant"] == f"without {number}"].set_index("key")
    if without.empty:
        raise PrincipleError(f"the leave-one-out answers have no variant without principle {number}")
    keys = [k for k in full.index if k in without.index]
    table = pd.DataFrame({"prompt": [full.at[k, "prompt"] for k in keys],
                          "answer_a": [full.at[k, "response"] for k in keys],
                          "answer_b": [without.at[k, "response"] for k in keys],
                          "triggers_a": [list(full.at[k, "triggers"]) for k in keys],
                          "triggers_b": [list(without.at[k, "triggers"]) for k in keys]})
    return _compared(table)


def plot_leave_one_out(summary):
    """Horizontal bars, one per principle left out, largest effect on top: how much of the full
    set's responses changed (`effect`), and beside it, where answers were scored, the mean shift of
    the citation likelihoods. Returns the first Axes."""
    import matplotlib.pyplot as plt

    scored = bool(summary["score_shift"].notna().any())
    _, axes = plt.subplots(1, 1 + scored, figsize=(5 + 4 * scored, 0.3 * len(summary) + 1.6), sharey=True,
                           squeeze=False)
    shown = summary.iloc[::-1]  # barh draws the first row at the bottom
    ax = axes[0][0]
    ax.barh(shown["principle"], shown["effect"], color="#c63")
    ax.set(xlabel="1 - mean ROUGE-L overlap\nwith the full set's responses", xlim=(0, 1))
    ax.set_title("Leaving one principle out: how much the responses changed", loc="left", fontsize=10)
    if scored:
        axes[0][1].barh(shown["principle"], shown["score_shift"].fillna(0.0), color="#36a")
        axes[0][1].set(xlabel="mean shift of the citation\nlikelihoods (TV distance)",
                       xlim=(0, max(1e-3, float(shown["score_shift"].max()) * 1.1)))
    ax.figure.tight_layout()
    return ax


# ---- a run's leave-one-out ----

def choose_prompts(records: list[dict], n: int) -> list[dict]:
    """`n` distinct prompts of stage 2's records: kept ones before dropped ones, and one of each
    red-team type before a second of any."""
    unique, texts = [], set()
    for record in sorted(records, key=lambda r: r.get("status") == "dropped"):
        if record["prompt"] not in texts:
            unique.append(record)
            texts.add(record["prompt"])
    chosen, seen = [], set()
    for second_round in (False, True):
        for index, record in enumerate(unique):
            kind = record.get("type") or SELF_INSTRUCT
            if len(chosen) < n and index not in chosen and (second_round or kind not in seen):
                chosen.append(index)
                seen.add(kind)
    return [{"id": unique[i]["id"], "prompt": unique[i]["prompt"], "type": unique[i].get("type")} for i in chosen]


def stage_two(run: Run) -> tuple[self_align.SelfAlignConfig, list[dict]]:
    """The settings the run's stage 2 answered under (its manifest) and its records (kept ones with
    status "kept", then drops); RunError naming the command to run when the run has no stage 2."""
    manifest = run.stages().get(self_align.STAGE)
    stage = run.stage(self_align.STAGE) if manifest else None
    if stage is None or not ((stage.path / "responses.jsonl").exists() or (stage.path / "drops.jsonl").exists()):
        raise RunError(f"run {run.name!r} has no stage-2 answers in {run.root / self_align.STAGE}: run "
                       f"`selfalign stage self-align --run {run.name}` (or chapter 2) first")
    fields = {f.name for f in dataclasses.fields(self_align.SelfAlignConfig)}
    config = from_mapping(self_align.SelfAlignConfig, {k: v for k, v in manifest["params"].items() if k in fields})
    return config, [r for r in self_align.records(run.name, run.root.parent) if r.get("prompt")]


def run(config: LeaveOneOutConfig, loaded=None, engine=None, scorer=None):
    """Leave-one-out on the run's stage-2 prompts under stage 2's own settings and principles (with
    this config's prompt count, answer length and seed); writes `runs/<run>/leave_one_out/`
    answers.jsonl and summary.csv, resuming what is there. Returns (answers, summary)."""
    run_dir = Run(config.run, config.runs_dir)
    settings, records = stage_two(run_dir)
    principle_set = load_principle_set(settings.principles, settings.exemplars, settings.template)
    recorded = run_dir.stages()[self_align.STAGE]["params"].get("principles_hash")
    if recorded and recorded != principle_set.hash:
        raise PrincipleError(f"stage 2 of run {config.run!r} answered under principle set {recorded}, but its files "
                             f"({settings.principles}) now hash to {principle_set.hash}: they changed after the run")
    principle_set.without(*config.loo_principles)  # a number the set lacks fails here, before a model loads
    sampling = dataclasses.replace(settings, model=config.model or settings.model, seed=config.seed,
                                   max_new_tokens=config.loo_max_new_tokens, batch_size=config.batch_size,
                                   backend=config.backend, tensor_parallel_size=config.tensor_parallel_size,
                                   replicas=config.replicas, ray_address=config.ray_address)
    prompts = choose_prompts(records, config.loo_prompts)
    check_room(sampling.model, engine or loaded, loo_max_new_tokens=config.loo_max_new_tokens)
    stage = run_dir.stage(STAGE)
    stage.start({**settings_of(sampling), "request": request_of(prompts, principle_set, sampling, config.loo_scores)},
                restart=config.restart)
    if engine is None:
        if loaded is None and config.backend != "vllm":
            loaded = load_model(sampling.model)
        engine = engine_for(sampling, loaded, progress=False)  # one bar, over the variants
    if scorer is None and config.loo_scores:
        scorer = self_align.principle_scorer(sampling, engine, loaded, progress=False)  # as stage 2 scores
    answers, summary = leave_one_out(prompts, engine, principle_set, sampling, scorer if config.loo_scores else None,
                                     stage.path / "answers.jsonl", config.loo_principles or None, progress=True)
    summary.to_csv(stage.path / "summary.csv", index=False)
    stage.finish({"prompts": len(prompts), "variants": int(answers["variant"].nunique()), "answers": len(answers)})
    return answers, summary
