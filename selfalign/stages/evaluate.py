"""Stage 5: evaluation. The base model and each trained adapter of a run on the same benchmarks.

Models: `base`, then `engraved` (stage 3) and `verbose` (stage 4) when the run has their adapters.
Benchmarks (`selfalign.evals`, scored by `selfalign.scoring`; data from `data_dir`):
- `truthfulqa`: MC1 and MC2 by answer log-likelihood after the benchmark's QA primer, and the
  paper's true/false exam variant of MC1 (labelled `truthfulqa_mc_paper`; it is not comparable
  with MC1);
- `hhh`: BIG-bench HHH accuracy by total and per-token answer log-likelihood and by the paper's A/B
  exam scored in both orders, overall and per subset;
- `vicuna`: each model answers the Vicuna questions (greedy, no principles); a judge model
  compares each adapted model's answer with the base model's in both orders. With a small judge
  (the default is the base model itself) the verdicts are a smoke test, and the table says so.

The paper's protocols (the true/false and A/B exams, the Vicuna answers and the judge) are asked
in the run's own chat format, the one stage 3 trained on (`run_chat_format`): its system overview,
the exam as the user turn, the assistant's marker and the opening of its reply, then the scored
label. Every model, the base one included, is asked in that format, so the columns differ only in
the weights. A run that records no format gets the default template, and the manifest says so;
the format is a setting, so a resume under another one is refused.

`limit` takes a seeded sample of each benchmark's items (the same items for every model).
Each (model, benchmark) is written as it finishes, so an interrupted stage redoes at most one.

Writes `runs/<run>/evaluate/`: items.jsonl (one record per model and item), summary.jsonl,
answers.jsonl and calls.jsonl (Vicuna answers), and summary.csv / summary.md, the comparison
table (one row per benchmark and metric, one column per model).
"""

from __future__ import annotations

import random
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from .. import evals as ev, public_data
from ..chat_format import ChatFormat
from ..generation import SamplingParams, engine_for
from ..config import ReplicaSettings, StageSettings
from ..model_files import check_adapter_weights
from ..models import load_model
from ..records import Run, RunError, provenance
from ..scoring import ModelScorer
from ..training import adapted_for_generation, adapter_info, adapters_for_generation
from .common import (check_model, check_ranges, check_resume, check_room, generate_into, generation_record,
                     settings_of)

STAGE = "evaluate"
BENCHMARKS = ("truthfulqa", "hhh", "vicuna")
DEFAULT_FORMAT_NOTE = ("default: the run records no chat format (no stage-3 manifest or adapter), "
                       "so principles/engrave_template.yaml was used")


@dataclass
class EvaluateConfig(ReplicaSettings, StageSettings):  # replicas: the Vicuna answers'; scoring stays here
    benchmarks: tuple[str, ...] = BENCHMARKS
    limit: int = 10  # items sampled from each benchmark (0: all; TruthfulQA has 817, HHH 221, Vicuna 80)
    vicuna_limit: int = 2  # Vicuna questions (0: as limit); each model generates an answer to each
    # truthfulqa.csv, hhh_alignment/, vicuna_questions.jsonl; "": what `selfalign data prepare` wrote
    data_dir: str = ""
    truthfulqa_paper: bool = True  # also the paper's true/false exam variant of MC1
    judge: str = ""  # the Vicuna judge: a model name or directory; "": the base model
    max_new_tokens: int = 64  # per Vicuna answer
    batch_size: int = 16
    max_batch_tokens: int = 2048  # rows x padded width per scoring pass: long items go alone

    def __post_init__(self):
        check_ranges(self, non_negative=("limit", "vicuna_limit"),
                     positive=("max_new_tokens", "max_batch_tokens"), non_empty=("benchmarks",))
        unknown = set(self.benchmarks) - set(BENCHMARKS)
        if unknown:
            raise ValueError(f"unknown benchmarks {sorted(unknown)}; choose from {', '.join(BENCHMARKS)}")


def models_of(run_dir: Run) -> dict[str, Path | None]:
    """{label: adapter directory or None for the base model} for the adapters this run has."""
    found: dict[str, Path | None] = {"base": None}
    for label, stage in (("engraved", "engrave"), ("verbose", "verbose")):
        adapter = run_dir.stage(stage).adapter
        if (adapter / "adapter_config.json").exists() and run_dir.stage(stage).finished:
            found[label] = adapter
    return found


def sample(items: list, limit: int, seed: int) -> list:
    """`limit` items chosen by a seeded draw, in their original order (all when limit is 0)."""
    if not limit or limit >= len(items):
        return list(items)
    keep = set(random.Random(seed).sample(range(len(items)), limit))
    return [item for index, item in enumerate(items) if index in keep]


def run(config: EvaluateConfig, loaded=None) -> dict:
    if "vicuna" in config.benchmarks:  # the one benchmark that generates; before the run's folder is made
        check_room(config.model, loaded, max_new_tokens=config.max_new_tokens)
    run_dir = Run(config.run, config.runs_dir)
    stage = run_dir.stage(STAGE)
    models = models_of(run_dir)
    chat, source = _chat_format_and_source(run_dir)
    # Everything that can fail without generating fails here, before the manifest records settings.
    data = _load_data(config)
    if loaded is None:
        check_model(config.model)
    if config.judge:
        check_model(config.judge)
    for adapter in filter(None, models.values()):
        check_adapter_weights(adapter)  # a damaged or pickled adapter fails here, not after the base model's scores
    # The format is a setting: answers and exams asked in two formats must not share a table.
    settings = {**settings_of(config), "models": sorted(models), "chat_format": chat.to_dict(),
                "chat_format_source": source}
    if "vicuna" in config.benchmarks:
        check_resume(stage, settings, config.restart, "calls.jsonl",
                     [item for label in models for item in _vicuna_items(label, data, chat)], drops=None)
    judging = "vicuna" in config.benchmarks and len(models) > 1
    # A judge that does not load must fail before the manifest records it, not after the scores.
    judge = load_model(config.judge) if judging and config.judge else None
    stage.start(settings, restart=config.restart)
    loaded = loaded or load_model(config.model)

    with stage.writer("items.jsonl", "eval_item/1") as items, stage.writer("summary.jsonl", "eval_summary/1") as summary:
        done = {row["id"].rsplit(":", 2)[0] for row in stage.read("summary.jsonl")} if len(summary) else set()
        answers: dict[str, list[str]] = {}
        # Every model's Vicuna answers in shared batches, each row through its model's adapter, where
        # the engine can mix adapters ("hf", one process); elsewhere one model after another.
        together = ("vicuna" in config.benchmarks and len(models) > 1 and getattr(config, "backend", "hf") == "hf"
                    and config.replicas == 1)
        for label, adapter in models.items():
            with adapted_for_generation(loaded, adapter) if adapter else nullcontext(loaded) as model:
                scorer = ModelScorer(model, batch_size=config.batch_size,
                                     options={"max_batch_tokens": config.max_batch_tokens})
                for benchmark in ("truthfulqa", "truthfulqa_paper", "hhh"):
                    if benchmark.split("_")[0] not in config.benchmarks or f"{label}:{benchmark}" in done:
                        continue
                    if benchmark == "truthfulqa_paper" and not config.truthfulqa_paper:
                        continue
                    result = _score(benchmark, scorer, data, chat)
                    _write(items, summary, result, label, benchmark)
                if "vicuna" in config.benchmarks and not together:
                    # `model` is adapted for the Hugging Face backends; vLLM and replicas apply `adapter` themselves.
                    answers.update(_answer(stage, {label: adapter}, data["vicuna"], chat, config, lambda: nullcontext(
                        engine_for(config, model, adapter=str(adapter) if adapter else None, truncate="left"))))
        if together:
            answers = _answer(stage, models, data["vicuna"], chat, config,
                              lambda: _engine_with_adapters(loaded, models, config), mixed=True)
        if judging:
            judge = judge or loaded
            for label in [m for m in models if m != "base"]:
                if f"{label}:vicuna" in done:
                    continue
                result = ev.judge_pairwise(judge, data["vicuna"], answers[label], answers["base"],
                                           name_a=label, name_b="base", chat=chat, batch_size=config.batch_size)
                _write(items, summary, result, label, "vicuna")

    table = comparison(config.run, config.runs_dir)
    answered = len(stage.read("calls.jsonl")) if (stage.path / "calls.jsonl").exists() else 0
    if not len(table) and not answered:  # nothing to compare: a failure, not an empty table
        raise stage.fail(f"scored no benchmark item and wrote no Vicuna answer (benchmarks: "
                         f"{', '.join(config.benchmarks) or 'none'})", {"models": list(models), "rows": 0})
    ev.write_table(table, stage.path / "summary.csv")
    notes = sorted({note for note in table.get("note", []) if note})
    (stage.path / "summary.md").write_text(ev.markdown_table(table.drop(columns=["note"], errors="ignore"))
                                           + "".join(f"\nNote: {note}\n" for note in notes), encoding="utf-8")
    stage.finish({"models": list(models), "rows": len(table)})
    return stage.manifest()


def run_chat_format(run_dir: Run) -> ChatFormat:
    """The conversation format the run's models were trained in: stage 3's manifest records it,
    else its adapter's `selfalign_adapter.json`; a run with neither gets the default template."""
    return _chat_format_and_source(run_dir)[0]


def _chat_format_and_source(run_dir: Run) -> tuple[ChatFormat, str]:
    engraved = run_dir.stage("engrave")
    recorded = ((engraved.manifest() or {}).get("params") or {}).get("chat_format")
    if recorded:
        return ChatFormat(**recorded), "engrave manifest"
    adapter = engraved.adapter
    if (adapter / "adapter_config.json").is_file() and (recorded := adapter_info(adapter).get("chat_format")):
        return ChatFormat(**recorded), "engrave adapter"
    return ChatFormat.load(), DEFAULT_FORMAT_NOTE


def data_folder(data_dir: str | Path) -> Path:
    """The folder the benchmarks are read from: `data_dir`, or "" for the prepared public data in the cache."""
    return Path(data_dir) if str(data_dir) else public_data.data_dir()


def data_files(data_dir: str | Path) -> dict[str, Path]:
    root = data_folder(data_dir)
    return {"truthfulqa": root / "truthfulqa.csv", "hhh": root / "hhh_alignment",
            "vicuna": root / "vicuna_questions.jsonl"}


def available(data_dir: str | Path) -> tuple[str, ...]:
    """The benchmarks whose data is in data_dir."""
    return tuple(name for name, path in data_files(data_dir).items() if path.exists())


def _load_data(config) -> dict:
    files = data_files(config.data_dir)
    missing = [str(files[b]) for b in config.benchmarks if not files[b].exists()]
    if missing:
        raise RunError(f"benchmark data not found: {', '.join(missing)}; `selfalign data prepare` fetches it (or "
                       "takes an offline copy, --from DIR), or pass data_dir, or leave those benchmarks out")
    data = {}
    if "truthfulqa" in config.benchmarks:
        data["truthfulqa"] = sample(ev.load_truthfulqa(files["truthfulqa"]), config.limit, config.seed)
    if "hhh" in config.benchmarks:
        data["hhh"] = sample(ev.load_hhh(files["hhh"]), config.limit, config.seed)
    if "vicuna" in config.benchmarks:
        data["vicuna"] = sample(ev.load_vicuna_questions(files["vicuna"]), config.vicuna_limit or config.limit,
                                config.seed)
    return data


def _score(benchmark: str, scorer, data: dict, chat: ChatFormat):
    if benchmark == "truthfulqa":
        return ev.truthfulqa_mc(scorer, data["truthfulqa"])
    if benchmark == "truthfulqa_paper":
        return ev.truthfulqa_mc_paper(scorer, data["truthfulqa"], chat=chat)
    return ev.hhh_eval(scorer, data["hhh"], chat=chat)


def _write(items, summary, result, label: str, unit: str) -> None:
    """A finished (model, benchmark) unit: its items, then its summary rows (which mark it done)."""
    for record in ev.item_records(result):
        items.write({**record, "id": f"{label}:{record['id']}", "model": label})
    for record in ev.summary_records([result]):
        # The first two parts of the id name the unit, so a resumed stage knows it is done.
        items_id = f"{label}:{unit}:{record['benchmark']}:{record['metric']}"
        summary.write({**record, "id": items_id, "model": label, "judge": result.model if unit == "vicuna" else "",
                       "note": record.get("note") or ""})


def _answer(stage, models: dict, questions: list[dict], chat: ChatFormat, config, open_engine,
            mixed: bool = False) -> dict[str, list[str]]:
    """{label: that model's greedy answers to the Vicuna questions, in question order}, resumable.

    `open_engine()` gives a context holding the engine (which cuts a long question from the left, so
    that it still gets an answer); it is opened only when an answer is missing (so that a resumed
    stage starts no engine, nor replicas). `mixed`: the engine's model holds
    every adapter of `models` ({label: adapter or None}) and each call runs through its model's
    (`training.adapters_for_generation`), all decoded in the same batches: the book's 3 models took
    0.7x the time of one model at a time, with the same answers (benchmarks/RESULTS.md).
    """
    params = SamplingParams(temperature=0.0, max_new_tokens=config.max_new_tokens, stop=(chat.stop,),
                            seed=config.seed)
    items = {label: _vicuna_items(label, {"vicuna": questions}, chat) for label in models}
    label_of = {key: label for label, pairs in items.items() for key, _ in pairs}
    origins = {label: provenance(f"{config.model}:{label}", params.to_dict(), config.seed) for label in models}
    with stage.writer("calls.jsonl", "generation/1") as calls:
        todo = [pair for pairs in items.values() for pair in pairs]
        if any(key not in calls for key, _ in todo):
            with open_engine() as engine:
                generate_into(calls, todo, engine, params,
                              lambda key, text, completion: generation_record(key, text, completion,
                                                                              origins[label_of[key]]),
                              adapters={key: label if models[label] else None for key, label in label_of.items()}
                              if mixed else None)
    by_key = {row["id"]: row["completion"].strip() for row in stage.read("calls.jsonl")}
    return {label: [by_key[key] for key, _ in pairs] for label, pairs in items.items()}


@contextmanager
def _engine_with_adapters(loaded, models: dict, config):
    """The engine on the base model holding every adapter of `models`, for `_answer(mixed=True)`."""
    with adapters_for_generation(loaded, {label: adapter for label, adapter in models.items() if adapter}) as model:
        yield engine_for(config, model, truncate="left")


def _vicuna_items(label: str, data: dict, chat: ChatFormat) -> list[tuple[str, str]]:
    """(call id, prompt) of one model's Vicuna answers, in question order."""
    return [(f"{label}:{q['question_id']}", chat.prompt(q["question"])) for q in data["vicuna"]]


def comparison(run: str, runs_dir: str = "runs"):
    """The summary as one row per benchmark and metric, one column per model (Vicuna: each adapted
    model against the base model, so the base column is empty there)."""
    import pandas as pd

    path = Run(run, runs_dir).stage(STAGE).path / "summary.jsonl"
    rows = Run(run, runs_dir).stage(STAGE).read("summary.jsonl") if path.exists() else []
    if not rows:
        return pd.DataFrame(columns=["benchmark", "metric", "n"])
    frame = pd.DataFrame(rows)
    table = frame.pivot_table(index=["benchmark", "metric"], columns="model", values="value", sort=False)
    order = [m for m in ("base", "engraved", "verbose") if m in table.columns]
    table = table[order].reset_index()
    n = frame.groupby(["benchmark", "metric"], sort=False)["n"].max().reset_index()
    notes = frame.groupby(["benchmark", "metric"], sort=False)["note"].first().reset_index()
    return table.merge(n, on=["benchmark", "metric"]).merge(notes, on=["benchmark", "metric"])


def tables(run: str, runs_dir: str = "runs") -> dict:
    """items, summary and calls (Vicuna answers) as DataFrames."""
    from .common import stage_frames

    return stage_frames(Run(run, runs_dir).stage(STAGE), {
        "items": ["id", "benchmark", "model", "scores"],
        "summary": ["id", "benchmark", "metric", "model", "value", "n", "note"],
        "calls": ["id", "prompt", "completion", "finish_reason"],
    })


def truthfulqa_by_category(run: str, runs_dir: str = "runs", metric: str = "mc1"):
    """Mean MC1 (or MC2) per TruthfulQA category and model, with each category's question count."""
    import pandas as pd

    items = tables(run, runs_dir)["items"]
    items = items[items["benchmark"] == "truthfulqa_mc"]
    if not len(items):
        return pd.DataFrame(columns=["n"])
    scores = pd.json_normalize(items["scores"].tolist()).assign(model=items["model"].tolist())
    table = scores.pivot_table(index="category", columns="model", values=metric, aggfunc="mean")
    table = table[[m for m in ("base", "engraved", "verbose") if m in table.columns]]
    table.insert(0, "n", scores.groupby("category").size() // scores["model"].nunique())
    return table.sort_values("n", ascending=False)


def vicuna_answers(run: str, runs_dir: str = "runs", data_dir: str | Path = ""):
    """One row per Vicuna question: the question, then each model's answer, then each trained
    model's verdict against the base model."""
    import pandas as pd

    frames = tables(run, runs_dir)
    calls = frames["calls"]
    if not len(calls):
        return pd.DataFrame(columns=["question"])
    parts = calls["id"].str.split(":", n=1)
    calls = calls.assign(model=parts.str[0], question_id=parts.str[1])
    table = calls.pivot_table(index="question_id", columns="model", values="completion", aggfunc="first")
    table = table[[m for m in ("base", "engraved", "verbose") if m in table.columns]]
    path = data_files(data_dir)["vicuna"]
    questions = {str(q["question_id"]): q["question"] for q in ev.load_vicuna_questions(path)} if path.exists() else {}
    table.insert(0, "question", [questions.get(str(i), "") for i in table.index])
    items = frames["items"]
    for _, row in items[items["benchmark"] == "vicuna_pairwise"].iterrows():
        question = row["id"].split(":")[-1]
        if question in table.index:
            table.loc[question, f"{row['model']} vs base"] = row["scores"]["verdict"]
    return table
