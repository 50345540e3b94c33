"""Stage 3: principle engraving. LoRA-tune the base model on stage 2's answers, without principles.

Stage 2's model answered with 16 principles and 5 exemplars in its context. Here each kept answer
becomes a training example whose context is only a short system overview and the user's prompt
(`principles/engrave_template.yaml`), so the tuned model learns to answer that way with nothing
but the question in front of it. The loss covers the answer tokens only. The conversations of
`principles/identity.yaml`, in which the assistant says who it is, are trained on too (never held
out), as Dromedary added its own.

A share of the answers is held out. After training, those held-out answers are scored (mean
log-probability per token, principles absent from the context) under the base model and under the
engraved one: if engraving worked, the engraved model finds the principle-guided answers likelier.

Reads: `runs/<run>/self_align/responses.jsonl` (or any file of response records).
Writes: `runs/<run>/engrave/` data.jsonl (each record's split or drop reason), loss.jsonl,
checkpoints/, adapter/ (a PEFT adapter with the tokenizer), comparison.jsonl.
Under `accelerate launch` the training runs on every process; files are written by the first.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from ..chat_format import ChatFormat
from ..config import StageSettings
from ..inputs import PRINCIPLES_DIR
from ..records import Run, RunError, adapter_path, read_jsonl
from ..training import (TrainSettings, fit_and_compare, load_for_training, load_identity, process_state, split_holdout,
                        train_settings)
from .common import check_model, check_ranges, principle_texts, settings_of

STAGE = "engrave"
RESPONSE_FIELDS = {"id": str, "prompt": str, "answer": str}  # what a response record must hold to train on


@dataclass
class EngraveConfig(TrainSettings, StageSettings):  # this order puts run, model, ... first
    responses: str = ""  # a response file; "": this run's stage-2 responses
    template: str = str(PRINCIPLES_DIR / "engrave_template.yaml")
    identity: str = str(PRINCIPLES_DIR / "identity.yaml")  # self-introductions trained on too ("": none)
    holdout: float = 0.2  # share of answers kept out of training to measure the effect
    min_examples: int = 4
    allow_incomplete: bool = False  # train on an unfinished stage 2's responses instead of stopping

    def __post_init__(self):
        TrainSettings.check(self)  # the LoRA and optimiser fields; these are the stage's own:
        check_ranges(self, non_negative=("min_examples",))
        if not 0 <= self.holdout < 1:  # a share, and 1 would leave nothing to train on
            raise ValueError(f"holdout must be in [0, 1), got {self.holdout!r}")


def responses_of(run_dir: Run, path: str, allow_incomplete: bool) -> tuple[list[dict], Path, str]:
    """Stage 2's kept responses and the name it answered under. An unfinished stage 2 stops this
    stage, unless allow_incomplete (then its responses so far are used)."""
    if path:
        file = Path(path)
        if not file.is_file():
            raise RunError(f"response file {file} does not exist")
        return list(read_jsonl(file, RESPONSE_FIELDS, unique="id")), file, ""
    stage = run_dir.stage("self_align")
    file = stage.path / "responses.jsonl"
    manifest = stage.manifest()
    if manifest is None or not file.exists():
        raise RunError(f"run {run_dir.name!r} has no stage-2 responses ({file}); run stage 2 (self-align) first")
    rows = list(read_jsonl(file, RESPONSE_FIELDS, unique="id"))
    if manifest["status"] == "failed" and not allow_incomplete:
        raise RunError(f"stage 2 of run {run_dir.name!r} failed: {manifest.get('failure')}; rerun it with other "
                       f"settings (--restart), or pass allow_incomplete to train on its {len(rows)} responses")
    if manifest["status"] != "finished" and not allow_incomplete:
        raise RunError(f"stage 2 of run {run_dir.name!r} is not finished ({len(rows)} responses so far); finish it "
                       "(rerun self-align, it resumes) or pass allow_incomplete to train on what is there")
    return rows, file, manifest["params"].get("assistant", "")


def principles_hash(rows: list[dict]) -> str | None:
    """The hash of the principle set stage 2 answered under, from its records' provenance (None for
    a file without it; several, comma-joined, for a file that mixes sets)."""
    hashes = sorted({(r.get("provenance") or {}).get("principles_hash") for r in rows} - {None})
    return ", ".join(hashes) or None


def rename(answer: str, old: str, new: str) -> str:
    """Stage 2 generated under another name (the paper: Watson); the trained model is called `new`."""
    if not old or old == new:
        return answer
    return re.sub(rf"\b{re.escape(old)}\b", new, answer)


def run(config: EngraveConfig, loaded=None) -> dict:
    state = process_state()
    run_dir = Run(config.run, config.runs_dir)
    stage = run_dir.stage(STAGE)
    chat = ChatFormat.load(config.template)
    config.accumulation_steps(state.num_processes)  # a total_batch_size these processes cannot make
    rows, source, generated_as = responses_of(run_dir, config.responses, config.allow_incomplete)
    records = [{"id": r["id"], "prompt": r["prompt"], "answer": rename(r["answer"], generated_as, chat.assistant)}
               for r in rows]
    identity = load_identity(config.identity, chat) if config.identity else []
    data_hash = hashlib.sha256(source.read_bytes()).hexdigest()
    if loaded is None or config.quantize:  # a model handed in is not the quantized one asked for
        check_model(config.model, quantize=config.quantize)
    if state.is_main_process:
        # The data's hash is a setting: new responses make a new training set, not a resumable one.
        stage.start({**settings_of(config), "data_sha256": data_hash, "chat_format": chat.to_dict(),
                     "identity_records": identity}, restart=config.restart)
    state.wait_for_everyone()
    loaded = load_for_training(config.model, train_settings(config), loaded)
    # Only stage 2's answers are held out: the comparison measures how they moved into the weights.
    holdout = split_holdout([r["id"] for r in records], config.holdout, config.seed)
    records += identity
    counts = fit_and_compare(stage, loaded, records, chat, config, holdout,
                             {"stage": STAGE, "data": str(source), "data_sha256": data_hash,
                              "chat_format": chat.to_dict(), "principles_hash": principles_hash(rows)},
                             forbidden=principle_texts(run_dir))
    if state.is_main_process:
        stage.finish(counts)
    state.wait_for_everyone()
    return stage.manifest()


def adapter_dir(run: str, runs_dir: str = "runs", stage: str = STAGE) -> Path:
    """Where a run's stage-3 (or, with stage="verbose", stage-4) adapter is."""
    return adapter_path(Path(runs_dir) / run / stage)


def tables(run: str, runs_dir: str = "runs") -> dict:
    """data, loss and comparison as DataFrames."""
    from .common import stage_frames

    return stage_frames(Run(run, runs_dir).stage(STAGE), {
        "data": ["id", "prompt", "answer", "split", "tokens", "answer_tokens", "reason"],
        "loss": ["step", "epoch", "loss", "learning_rate", "grad_norm", "tokens"],
        "comparison": ["id", "answer_tokens", "base_logprob", "adapted_logprob"],
    })


def side_by_side(loaded, prompts: list[str], adapters: dict[str, str | Path], chat: ChatFormat | None = None,
                 max_new_tokens: int = 96, seed: int = 0):
    """Answers to the same prompts, in the training format with no principles, from the base model
    and from each adapter ({column name: adapter directory}), greedy so that differences come
    from the weights. One row per prompt. Every model's answers are decoded in the same batches,
    each row through its own adapter (`training.adapters_for_generation`)."""
    import pandas as pd

    from ..generation import Engine, SamplingParams
    from ..training import adapters_for_generation

    chat = chat or ChatFormat.load()
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, stop=(chat.stop,), seed=seed)
    texts = [chat.prompt(p) for p in prompts]
    columns = [None, *adapters]  # None: the base model
    rows = [(column, i) for column in columns for i in range(len(texts))]
    table = pd.DataFrame({"prompt": prompts})
    # Adapters by position: a column's name may hold characters peft's module names may not.
    names = {column: f"adapter{k}" for k, column in enumerate(adapters)}
    with adapters_for_generation(loaded, {names[c]: adapters[c] for c in adapters}) as model:
        completions = Engine.for_model(model, batch_size=16, progress=False).generate(
            [texts[i] for _, i in rows], params, keys=[f"{names.get(c, 'base')}/{i}" for c, i in rows],
            adapters=[names.get(c) for c, _ in rows])
    for k, column in enumerate(columns):
        table[column or "base"] = [c.text.strip() for c in completions[k * len(texts):(k + 1) * len(texts)]]
    return table


def plot_comparison(comparison, ax=None, label: str = "engraved"):
    """Held-out answers: mean log-probability per token under the base model (x) and the adapted
    one (y). Points above the diagonal are answers the adapted model finds likelier."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(4.5, 4.5))
    if len(comparison):
        ax.scatter(comparison["base_logprob"], comparison["adapted_logprob"], s=18)
        low = min(comparison["base_logprob"].min(), comparison["adapted_logprob"].min())
        high = max(comparison["base_logprob"].max(), comparison["adapted_logprob"].max())
        ax.plot([low, high], [low, high], color="grey", lw=1, ls="--")
    ax.set_xlabel("base model: mean log-prob per answer token")
    ax.set_ylabel(f"{label} model: mean log-prob per answer token")
    ax.set_title("Held-out answers, no principles in context")
    return ax
