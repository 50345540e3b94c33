"""A run's data as Hugging Face datasets in TRL's formats (`selfalign export`).

Three datasets, read from the run directory's files only:

- `sft`: stage 2's kept answers as TRL conversations (`messages`: the user's prompt, the answer),
  plus stage 3's identity conversations, marked `identity`;
- `verbose_sft`: the same for stage 4's teacher answers;
- `preferences`: stage 2's principle-guided answer (`chosen`) over the baseline stage's answer of the
  model as it is (`rejected`) to the same prompt, for DPO, where both exist and differ.

Each is written as parquet (`data/<name>.parquet`, what the card's `configs:` and so the Hub read)
and with `save_to_disk` (`<name>/`), beside a dataset card (`README.md`) that holds the counts,
stage 2's drop reasons, the principles file and every stage's settings.

A message holds only what a user and the assistant say: never the principles, the exemplars or the
model's internal thoughts, which SELF-ALIGN trains the model to do without; a message that contains
a principle's text stops the export, naming the record. This module computes nothing new about the
answers (no filtering beyond the stages' own, no scoring) and uploads only when asked.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections import Counter
from pathlib import Path

from . import __version__
from .export_folder import earlier_export, replace_export
from .records import Run, RunError, named, read_jsonl
from .untrusted import one_line

NAMES = ("sft", "verbose_sft", "preferences")
STAGE_ORDER = ("prompts", "self_align", "baseline", "engrave", "verbose", "evaluate")


def features(name: str):
    """The columns of each dataset, so that an empty one still has its schema."""
    from datasets import Features, Value

    text, turns = Value("string"), [{"role": Value("string"), "content": Value("string")}]
    about = {"id": text, "source": text, "type": text, "topic": text}
    origin = {"model": text, "principles_hash": text, "seed": Value("int64")}
    if name == "preferences":
        return Features({**about, "prompt": turns, "chosen": turns, "rejected": turns,
                         "chosen_model": text, "rejected_model": text, "principles_hash": text, "seed": Value("int64")})
    columns = {**about, "messages": turns, "identity": Value("bool"), "triggers": [Value("int64")], **origin,
               "split": text}
    if name == "verbose_sft":
        columns["cut_at_length"] = Value("bool")
    return Features(columns)


# Reading the run ---------------------------------------------------------------------------------

def open_run(run: str, runs_dir: str | os.PathLike = "runs") -> Run:
    """The run, without creating anything; a run without stage 2's answers is refused."""
    found = Run(run, runs_dir, create=False)
    responses = found.root / "self_align" / "responses.jsonl"
    if not found.root.is_dir():
        raise RunError(f"no run {run!r} in {runs_dir} ({found.root} does not exist)")
    if "self_align" not in found.stages() or not responses.is_file():
        raise RunError(f"run {run!r} has no stage-2 answers ({responses}); run `selfalign stage self-align "
                       f"--run {run}` first")
    return found


def _records(run: Run, stage: str, filename: str) -> list[dict]:
    path = run.root / stage / filename
    rows = list(read_jsonl(path)) if path.is_file() else []
    # Two writers on one stage, or a hand edit, can repeat an id: exported, one prompt would count twice
    # (training refuses the same file).
    repeated = next((key for key, n in Counter(row.get("id") for row in rows).items() if n > 1), None)
    if repeated is not None:
        raise RunError(f"{path} repeats the id {repeated!r}: each id must appear once (two processes writing one "
                       "stage, or a hand edit?); rerun the stage that wrote it with --restart")
    return rows


def _params(run: Run, stage: str) -> dict:
    return run.stages().get(stage, {}).get("params", {})


def _conversation(prompt: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": prompt.strip()}, {"role": "assistant", "content": answer.strip()}]


def _red_team(record: dict, prompts: dict[str, dict]) -> dict:
    """type and topic from the record, else from the stage-1 prompt it answers."""
    prompt = prompts.get(record["id"], {})
    return {key: record.get(key) if record.get(key) is not None else prompt.get(key) for key in ("type", "topic")}


def _origin(record: dict) -> dict:
    provenance = record.get("provenance") or {}
    return {key: provenance.get(key) for key in ("model", "principles_hash", "seed")}


def _answers(run: Run) -> list[tuple[dict, str]]:
    """Stage 2's kept records with their answer under the name stage 3 trained (stage 2 may have
    answered as Watson; stage 3 renames, and so does this)."""
    from .stages.engrave import rename

    generated_as = _params(run, "self_align").get("assistant", "")
    trained_as = (_params(run, "engrave").get("chat_format") or {}).get("assistant", "")
    return [(r, rename(r["answer"], generated_as, trained_as) if trained_as else r["answer"])
            for r in _records(run, "self_align", "responses.jsonl")]


def identity_records(run: Run) -> tuple[list[dict], str]:
    """Stage 3's identity conversations (id, prompt, answer) and where they were found."""
    from .chat_format import ChatFormat
    from .training import load_identity

    rows = [r for r in _records(run, "engrave", "data.jsonl") if r.get("source") == "identity" and r.get("answer")]
    if rows:
        return rows, "stage 3's data.jsonl"
    params = _params(run, "engrave")
    if params.get("identity_records"):
        return params["identity_records"], "stage 3's manifest"
    path = params.get("identity")
    if path and Path(path).is_file() and params.get("chat_format"):
        return load_identity(path, ChatFormat(**params["chat_format"])), f"{path}, read again"
    return [], "none: stage 3 has not run" if not params else "none: stage 3 trained on no identity file"


def sft_rows(run: Run) -> list[dict]:
    prompts = {p["id"]: p for p in _records(run, "prompts", "prompts.jsonl")}
    splits = {r["id"]: r.get("split") for r in _records(run, "engrave", "data.jsonl")}
    rows = [{"id": r["id"], "source": r.get("source"), **_red_team(r, prompts), "messages": _conversation(r["prompt"], a),
             "identity": False, "triggers": r.get("triggers") or [], **_origin(r), "split": splits.get(r["id"])}
            for r, a in _answers(run)]
    identity, _ = identity_records(run)
    return rows + [{"id": r["id"], "source": "identity", "type": None, "topic": None, "identity": True,
                    "messages": _conversation(r["prompt"], r["answer"]), "triggers": [], "model": None,
                    "principles_hash": None, "seed": None, "split": splits.get(r["id"])} for r in identity]


def verbose_rows(run: Run) -> list[dict]:
    prompts = {p["id"]: p for p in _records(run, "prompts", "prompts.jsonl")}
    stage_two = {r["id"]: r for r in _records(run, "self_align", "responses.jsonl")}
    splits = {r["id"]: r.get("split") for r in _records(run, "verbose", "data.jsonl")}
    rows = []
    for record in _records(run, "verbose", "answers.jsonl"):
        # Stage 2's source (self_instruct, red_team) where it has the prompt; stage 4 says only "self_align".
        source = stage_two.get(record["id"], {}).get("source") or record.get("source")
        # Triggers are those of stage 2's answer to the same prompt: the teacher cites no principles.
        rows.append({"id": record["id"], "source": source, **_red_team(stage_two.get(record["id"], record), prompts),
                     "messages": _conversation(record["prompt"], record["answer"]), "identity": source == "identity",
                     "triggers": stage_two.get(record["id"], {}).get("triggers") or [], **_origin(record),
                     "split": splits.get(record["id"]), "cut_at_length": bool(record.get("cut_at_length"))})
    return rows


def preference_rows(run: Run, skipped: Counter | None = None) -> list[dict]:
    """(chosen: stage 2, rejected: baseline) per prompt; `skipped` counts the pairs left out, by reason."""
    skipped = Counter() if skipped is None else skipped
    prompts = {p["id"]: p for p in _records(run, "prompts", "prompts.jsonl")}
    baseline = {r["id"]: r for r in _records(run, "baseline", "answers.jsonl")}
    rows = []
    for record, answer in _answers(run):
        base = baseline.get(record["id"])
        rejected = (base or {}).get("completion", "").strip()
        reason = ("no baseline answer" if base is None else
                  "baseline answered another prompt" if base["prompt"].strip() != record["prompt"].strip() else
                  "empty baseline answer" if not rejected else
                  "identical answers" if rejected == answer.strip() else None)
        if reason:
            skipped[reason] += 1
            continue
        rows.append({"id": record["id"], "source": record.get("source"), **_red_team(record, prompts),
                     "prompt": [{"role": "user", "content": record["prompt"].strip()}],
                     "chosen": [{"role": "assistant", "content": answer.strip()}],
                     "rejected": [{"role": "assistant", "content": rejected}],
                     "chosen_model": _origin(record)["model"], "rejected_model": _origin(base)["model"],
                     "principles_hash": _origin(record)["principles_hash"], "seed": _origin(record)["seed"]})
    return rows


# The principles: shown in the card, and kept out of every message --------------------------------

def forbidden_texts(run: Run) -> list[tuple[str, str]]:
    """(what, text) pairs no message may contain: every principle, every exemplar's thoughts."""
    from .stages.common import principles_of

    _, principle_set, _ = principles_of(run)
    return ([(f"principle {p.number} ({p.name})", p.text) for p in principle_set.principles]
            + [(f"exemplar {e.id}'s thoughts", e.thoughts) for e in principle_set.exemplars])


def _flat(text: str) -> str:
    return " ".join(text.split())


def check_messages(name: str, rows: list[dict], forbidden: list[tuple[str, str]]) -> None:
    """Refuse to export a message that carries a principle or an exemplar, naming the record."""
    texts = [(what, _flat(text)) for what, text in forbidden if text.strip()]
    for row in rows:
        for column in ("messages", "prompt", "chosen", "rejected"):
            for message in row.get(column) or []:
                content = _flat(message["content"])
                leak = next((what for what, text in texts if text in content), None)
                if leak:
                    raise RunError(f"{name} record {row['id']}: its {message['role']} message holds the text of "
                                   f"{leak}; a SELF-ALIGN dataset must not teach with the principles in view")


# The card ---------------------------------------------------------------------------------------

def _fence(text: str, language: str = "") -> str:
    ticks = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", text)), default=0))
    return f"{ticks}{language}\n{text.rstrip()}\n{ticks}"


def dataset_card(run: Run, counts: dict[str, int], notes: dict[str, list[str]]) -> str:
    """README.md: a YAML header the Hub reads (configs of the non-empty datasets), then the rest."""
    import yaml

    manifests = run.stages()
    header = {"pretty_name": f"SELF-ALIGN data of run {run.name}", "language": ["en"],
              "task_categories": ["text-generation"], "tags": ["self-align", "synthetic", "trl", "sft", "dpo"],
              "configs": [{"config_name": name, "data_files": [{"split": "train", "path": f"data/{name}.parquet"}]}
                          for name in NAMES if counts[name]]}
    what = {"sft": "stage 2's kept answers (principle-guided, without the principles) and stage 3's identity "
                   "conversations (`identity: true`): TRL's conversational `messages`",
            "verbose_sft": "stage 4's teacher answers (the engraved model told to be thorough): `messages`",
            "preferences": "`prompt`/`chosen`/`rejected`: stage 2's answer over the baseline stage's answer of the "
                           "model as it is, to the same prompt (conversational preference format, for DPO)"}
    lines = ["---", yaml.safe_dump(header, sort_keys=False, allow_unicode=True).rstrip(), "---", "",
             f"# SELF-ALIGN data of run `{run.name}`", "",
             f"Exported by `selfalign export` (selfalign {__version__}) from the run directory `{run.root}`.", "",
             "| dataset | rows | what |", "|---|---:|---|"]
    lines += [f"| `{name}` | {counts[name]} | {what[name]} |" for name in NAMES]
    lines.append("")
    for name in NAMES:
        for note in notes[name] + ([] if counts[name] else ["it is empty, so `configs:` does not list it (datasets "
                                                           "cannot load a parquet file without rows); its schema "
                                                           "is in the files"]):
            lines.append(f"- `{name}`: {note}")
    lines += ["", "## Files", "",
              "- `data/<dataset>.parquet`: what `configs:` above points at, and so what the Hub and "
              "`datasets.load_dataset(DIR, \"sft\")` read;",
              "- `<dataset>/`: the same rows written by `Dataset.save_to_disk`, for `datasets.load_from_disk(\"DIR/sft\")`.",
              "", "Columns: `id` (the run's record id), `source` (self_instruct, red_team or identity), red-team "
              "`type` and `topic`, `triggers` (the principle numbers stage 2's thoughts cited), provenance "
              "(`model`, `principles_hash`, `seed`), `split` (train or holdout as stages 3-4 used the record, or "
              "dropped, where they ran). No message holds the principles, the exemplars or the internal thoughts. "
              "Stage 2's answers carry the name stage 3 trained under (as stage 3 renames them)."]
    drops = manifests["self_align"].get("counts", {}).get("drop_reasons") or \
        Counter(d.get("reason", "?") for d in _records(run, "self_align", "drops.jsonl"))
    lines += ["", "## Stage 2's drops", ""]
    lines += (["| reason | answers |", "|---|---:|", *(f"| {reason} | {n} |" for reason, n in drops.items())]
              if drops else ["Stage 2 dropped nothing."])
    from .stages.common import principles_of

    path, _, principle_notes = principles_of(run)
    lines += ["", "## The principles", "", f"Stage 2 answered behind these principles, `{path}`:"
              + "".join(f" note: {note}." for note in principle_notes), "",
              _fence(path.read_text(encoding="utf-8"), "yaml")]
    lines += ["", "## Settings", "", "Each stage's settings, as its manifest recorded them:"]
    for stage in sorted(manifests, key=lambda s: (STAGE_ORDER.index(s) if s in STAGE_ORDER else 99, s)):
        manifest = manifests[stage]
        lines += ["", f"### {stage} ({manifest.get('status')})", "",
                  _fence(json.dumps(manifest.get("params", {}), indent=2, ensure_ascii=False), "json")]
    lines += ["", "## Licence", "", "No licence is declared in the header: the answers were written by "
              + ", ".join(sorted({_params(run, s).get("model", "?") for s in manifests if _params(run, s).get("model")}))
              + ", whose terms apply to what it generates, and the principles are the selfalign-book project's own "
              "text (its package metadata says Apache-2.0; the repository has no LICENSE file). Set one before "
              "publishing."]
    return "\n".join(lines) + "\n"


def export_run(run: str, runs_dir: str | os.PathLike = "runs", out: str | os.PathLike = "export",
               overwrite: bool = False, push_to_hub: str | None = None) -> dict[str, int]:
    """Write the three datasets and the card into `out`; returns rows per dataset. The files are
    built beside `out` and moved in once all are written, so a failed export leaves `out` as it was;
    `overwrite` replaces an earlier export's files and no others (`export_folder.WRITTEN` lists them)."""
    import datasets

    found = open_run(run, runs_dir)
    out = Path(out)
    earlier = earlier_export(out, overwrite)
    skipped: Counter = Counter()
    rows = {"sft": sft_rows(found), "verbose_sft": verbose_rows(found), "preferences": preference_rows(found, skipped)}
    forbidden = forbidden_texts(found)
    for name, table in rows.items():
        check_messages(name, table, forbidden)
    counts = {name: len(table) for name, table in rows.items()}
    notes = _notes(found, rows, skipped)
    out.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a bar per file of a few rows is noise in a command's output
    try:
        (building / "data").mkdir()
        for name, table in rows.items():
            dataset = _dataset(name, table, found)
            dataset.to_parquet(str(building / "data" / f"{name}.parquet"))
            # An empty dataset gets no shard by default, and load_from_disk then fails on it.
            dataset.save_to_disk(str(building / name), num_shards=None if len(dataset) else 1)
        (building / "README.md").write_text(dataset_card(found, counts, notes), encoding="utf-8")
        replace_export(building, out, earlier)
    except OSError as error:  # a full disk: pyarrow's and the writes' errors name no file, or a temporary one
        raise named(error, out) from None
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
        shutil.rmtree(building, ignore_errors=True)
    if push_to_hub:
        upload(out, push_to_hub)
    return counts


def _dataset(name: str, table: list[dict], run: Run):
    """The rows as a datasets.Dataset of `features(name)`. The records were checked as they were
    read (`read_jsonl`); a value that still does not fit its column is named with the files it
    can have come from, not as pyarrow's "Failed to parse string ... as a scalar"."""
    import datasets

    columns = features(name)
    try:
        return datasets.Dataset.from_dict({key: [row[key] for row in table] for key in columns}, features=columns)
    except (ValueError, TypeError) as error:  # pyarrow's ArrowInvalid and ArrowTypeError among them
        sources = {"sft": "self_align/responses.jsonl, engrave/data.jsonl", "verbose_sft": "verbose/answers.jsonl",
                   "preferences": "self_align/responses.jsonl, baseline/answers.jsonl"}[name]
        field = next((key for key in columns if not _fits(key, columns[key], table)), "?")
        raise RunError(f"{run.root}: a record of {sources} holds a value {name}'s field {field!r} cannot take "
                       f"({one_line(error)})") from None


def _fits(key: str, column, table: list[dict]) -> bool:
    from datasets import Dataset, Features

    try:
        Dataset.from_dict({key: [row[key] for row in table]}, features=Features({key: column}))
    except (ValueError, TypeError):
        return False
    return True


def _notes(run: Run, rows: dict[str, list[dict]], skipped: Counter) -> dict[str, list[str]]:
    stages, counts = run.stages(), {name: len(table) for name, table in rows.items()}
    identity, where = identity_records(run)
    notes = {"sft": [f"{counts['sft'] - len(identity)} stage-2 answers and {len(identity)} identity conversations "
                     f"(from {where})"], "verbose_sft": [], "preferences": []}
    if stages["self_align"].get("status") != "finished":
        notes["sft"].append(f"stage 2 is {stages['self_align'].get('status')}, not finished: its answers so far")
    if "verbose" not in stages:
        notes["verbose_sft"].append("the run has no stage 4 (verbose)")
    elif not counts["verbose_sft"]:
        notes["verbose_sft"].append("stage 4 wrote no teacher answers")
    if "baseline" not in stages:
        notes["preferences"].append("the run has no baseline stage (`selfalign stage baseline`), so nothing to "
                                    "reject")
    elif skipped:
        notes["preferences"].append("pairs left out: " + ", ".join(f"{n} {why}" for why, n in skipped.items()))
    paired = {row["id"] for row in rows["preferences"]}
    cut = sum(r.get("finish_reason") == "length" for r in _records(run, "baseline", "answers.jsonl") if r["id"] in paired)
    if cut:  # the baseline's answers are the model as it is, cut-off ones included: say so, do not hide them
        notes["preferences"].append(f"{cut} rejected answers ran into the baseline's max_new_tokens")
    return notes


def upload(out: Path, repo: str) -> None:
    """The card and the parquet files to a dataset repository on the hub (HF_ENDPOINT, where set)."""
    from huggingface_hub import HfApi

    # Read here, not at import, so the endpoint set for this call is the one used.
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)
    try:
        api.create_repo(repo, repo_type="dataset", exist_ok=True)
        api.upload_folder(folder_path=str(out), repo_id=repo, repo_type="dataset",
                          allow_patterns=["README.md", "data/*.parquet"], commit_message="selfalign export")
    except Exception as error:  # the hub fails in many ways (network, login, offline mode); each reads the same
        detail = (str(error).strip().splitlines() or [""])[0]
        raise RunError(f"the export in {out} is complete, but pushing it to {repo} failed: "
                       f"{type(error).__name__}: {detail}") from None
