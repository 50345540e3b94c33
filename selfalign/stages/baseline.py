"""Baseline: the model as it is answers prompts, with no principles and no exemplars.

These answers are the "before" of SELF-ALIGN: the evaluation compares them with the engraved and
verbose models' answers. The stage is also the smallest complete use of the engine and the run
directory, so `make run` uses it as a smoke test of a fresh install.

Reads: the run's stage-1 prompts (`runs/<run>/prompts/prompts.jsonl`, once stage 1 finished) when
they exist, else `principles/seed_prompts.jsonl`, or any prompt file given as `prompts`.
Writes: `runs/<run>/baseline/answers.jsonl` (schema generation/1), drops.jsonl (prompts too long
for the model's context, with the reason) and `manifest.json`, which says `failed` when no prompt
was answered.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..generation import SamplingParams, engine_for
from ..config import GenerationSettings
from ..inputs import PRINCIPLES_DIR, load_prompts
from ..records import Run, provenance
from .common import (check_backend, check_model, check_ranges, check_resume, check_room, drop_reasons, generate_into,
                     generation_record, settings_of, shortfall, stage_one_prompts)

STAGE = "baseline"


@dataclass
class BaselineConfig(GenerationSettings):
    prompts: str = ""  # prompt file; "": this run's stage-1 prompts, else principles/seed_prompts.jsonl
    limit: int = 8  # answer the first N prompts (0: all)
    template: str = "User: {prompt}\n\nAssistant:"  # how a bare prompt is shown to the model
    stop: tuple[str, ...] = ("\nUser:",)
    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 64

    def __post_init__(self):
        check_ranges(self, non_negative=("limit", "temperature"), positive=("max_new_tokens",),
                     probabilities=("top_p",))
        check_backend(self.backend)


def run(config: BaselineConfig, loaded=None) -> dict:
    """Answer the prompts; resume where an earlier run stopped. Returns the stage's manifest."""
    check_room(config.model, loaded, max_new_tokens=config.max_new_tokens)  # before the run's folder is made
    run_dir = Run(config.run, config.runs_dir)
    stage = run_dir.stage(STAGE)
    # Everything that can fail without generating fails here, before the manifest records settings.
    generated = run_dir.root / "prompts" / "prompts.jsonl"
    if config.prompts:
        prompts = load_prompts(config.prompts)
    else:
        prompts = load_prompts(stage_one_prompts(run_dir) if generated.exists() else
                               PRINCIPLES_DIR / "seed_prompts.jsonl")
    if config.limit:
        prompts = prompts[: config.limit]
    if loaded is None:
        check_model(config.model, config.backend)
    params = SamplingParams(temperature=config.temperature, top_p=config.top_p,
                            max_new_tokens=config.max_new_tokens, stop=config.stop, seed=config.seed)
    source = {row["id"]: row for row in prompts}
    items = [(row["id"], config.template.format(prompt=row["prompt"])) for row in prompts]
    stored = {key: row["prompt"] for key, row in source.items()}  # the records' `prompt`: the bare one
    check_resume(stage, settings_of(config), config.restart, "answers.jsonl", items, stored)
    stage.start(settings_of(config), restart=config.restart)

    engine = engine_for(config, loaded)
    origin = provenance(config.model, params.to_dict(), config.seed)

    def record(key, text, completion):
        return generation_record(key, source[key]["prompt"], completion, origin, model_input=text)

    with stage.writer("answers.jsonl", "generation/1") as writer, stage.writer("drops.jsonl", "drop/1") as drops:
        generate_into(writer, items, engine, params, record, drops=drops, prompts=stored,
                      drop_fields=lambda key: {"prompt": source[key]["prompt"]})
        total, dropped = len(writer), len(drops)
    counts = {"answers": total, "prompts": len(prompts), "drops": dropped}
    if not total:  # the "before" of the evaluation, and `make run`'s smoke test: nothing is a failure
        reasons = drop_reasons(stage.read("drops.jsonl")) if dropped else {}
        raise stage.fail(shortfall(f"answered 0 of {len(prompts)} prompts", reasons),
                         {**counts, "drop_reasons": reasons})
    stage.finish(counts)
    return stage.manifest()
