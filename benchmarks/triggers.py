"""Stage 2 with and without the format grammar, on prompts nobody here wrote, in one run.

The prompts: Vicuna-80 questions (one per category) and BIG-bench HHH "harmless" requests, as
`selfalign data prepare` wrote them. For each variant of stage 2's settings it runs the stage as `selfalign stage
self-align` would (fresh run directory, the stage's defaults otherwise) and prints a markdown table:
kept answers, kept answers that cite at least one principle and no unknown one, records with
principle_scores, the stage's wall time and generated tokens per second of it (scoring included).
Sampled lengths differ between variants, so the grammar's own cost is timed apart: the first
variant's completions are replayed, 8 rows at a time, through `GrammarConstraint` (consume each
row's token, fill its mask, apply it to the logits), against the model's decode step at batch 8.
`--rev REV` adds the first variant under that git revision's principles, exemplars and template.
Run: `.venv/bin/python benchmarks/triggers.py [--prompts 16] [--variant 'constrain_format=false' ...] [--rev 7870612]`.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

from selfalign.models import DEFAULT_MODEL, load_model
from selfalign.principles import load_principle_set
from selfalign.public_data import data_dir
from selfalign.records import Run
from selfalign.stages import self_align

from prompt_budget import principle_files  # this folder's script, on the path when run as a script

DATA = data_dir()  # what `selfalign data prepare` wrote


def prompt_set(count: int) -> list[dict]:
    """Half Vicuna questions (one per category first), half HHH harmless requests."""
    rows = [json.loads(line) for line in (DATA / "vicuna_questions.jsonl").open()]
    rank = {}  # a question's place within its category: the first of every category come first
    for row in rows:
        rank[row["question_id"]] = sum(1 for r in rows if r["category"] == row["category"] and r["question_id"] < row["question_id"])
    vicuna = []
    for row in sorted(rows, key=lambda r: (rank[r["question_id"]], r["question_id"])):
        vicuna.append({"id": f"vicuna-{row['question_id']}", "prompt": row["turns"][0], "type": row["category"]})
    harmless = json.loads((DATA / "hhh_alignment" / "harmless.json").read_text())["examples"]
    red = [{"id": f"hhh-harmless-{i}", "prompt": " ".join(e["input"].split()), "type": "harmless"}
           for i, e in enumerate(harmless)]
    half = count // 2
    return vicuna[:count - half] + red[::max(1, len(red) // half)][:half]


def settings_of(text: str) -> dict:
    out = {}
    for pair in filter(None, text.split(",")):
        key, value = pair.split("=", 1)
        out[key.strip()] = json.loads(value) if value not in ("true", "false") else value == "true"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--variant", action="append",
                        help="comma-separated stage-2 settings, e.g. constrain_format=false (default: on and off)")
    parser.add_argument("--rev", action="append", default=[],
                        help="also the first variant under the principles, exemplars and template of this git revision")
    args = parser.parse_args()
    variants = args.variant or ["constrain_format=true", "constrain_format=false"]
    loaded = load_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        labels = list(variants)
        for rev in args.rev:  # the same settings, another revision's principle files (git show)
            files = dict(zip(("principles", "exemplars", "template"), principle_files(rev, Path(tmp))))
            variants.append(",".join([variants[0], *(f"{k}={json.dumps(str(v))}" for k, v in files.items())]))
            labels.append(f"{labels[0]}, principles of {rev}")
        prompts = Path(tmp) / "prompts.jsonl"
        prompts.write_text("".join(json.dumps(r) + "\n" for r in prompt_set(args.prompts)))
        rows = []
        for index, (variant, label) in enumerate(zip(variants, labels)):
            # min_responses 0: a variant that keeps few is a row of this table, not a failed run.
            config = self_align.SelfAlignConfig(run=f"v{index}", runs_dir=tmp, model=args.model, prompts=str(prompts),
                                                limit=0, min_responses=0, **settings_of(variant))
            started = time.perf_counter()
            manifest = self_align.run(config, loaded=loaded)
            wall = time.perf_counter() - started
            stage = Run(config.run, tmp).stage(self_align.STAGE)
            calls, kept = list(stage.read("calls.jsonl")), list(stage.read("responses.jsonl"))
            valid = sum(1 for r in kept if r["triggers"] and not r["unknown_citations"])
            scored = sum(1 for r in kept if r.get("principle_scores"))
            tokens = sum(c["completion_tokens"] for c in calls)
            n = manifest["counts"]["prompts"]
            rows.append((label, f"{len(kept)}/{n} ({len(kept) / n:.0%})",
                         f"{valid}/{len(kept)} ({valid / max(len(kept), 1):.0%})", f"{scored}/{len(kept)}",
                         f"{wall:.0f}", f"{tokens / wall:.1f}", json.dumps(manifest["counts"]["drop_reasons"])))
        config = self_align.SelfAlignConfig(**settings_of(variants[0]))
        grammar = self_align.sampling(config, load_principle_set()).grammar
        completions = [c["completion"] for c in Run("v0", tmp).stage(self_align.STAGE).read("calls.jsonl")]
        mask_ms = grammar_cost(loaded, completions[:8], grammar) if grammar else None
    print(f"machine: {platform.processor() or platform.machine()}, model {args.model}, {args.prompts} prompts")
    print("| settings | kept | cite >= 1, none unknown | scored | wall s | tokens/s | drop reasons |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if mask_ms is not None:
        step_ms = decode_step_ms(loaded)
        print(f"\ngrammar mask per decode step at batch 8: {mask_ms:.2f} ms; the model's decode step behind the "
              f"principles at batch 8: {step_ms:.0f} ms ({mask_ms / step_ms:.1%} of it)")


def grammar_cost(loaded, completions: list[str], grammar: str) -> float:
    """ms per step to keep 8 rows' matchers and masks, replaying completions written under `grammar`."""
    import torch

    from selfalign.generation.grammar import GrammarConstraint, grammar_tokenizer

    rows = [loaded.tokenizer(text, add_special_tokens=False)["input_ids"] for text in completions]
    steps = min(len(r) for r in rows)
    ll_tokenizer = grammar_tokenizer(loaded.tokenizer, [loaded.tokenizer.eos_token_id])
    constraint = GrammarConstraint(ll_tokenizer, grammar, len(rows), prompt_width=1)
    ids = torch.zeros(len(rows), 1, dtype=torch.long)
    scores = torch.zeros(len(rows), loaded.model.config.vocab_size)
    started = time.perf_counter()
    for step in range(steps):
        constraint(ids, scores)
        ids = torch.cat([ids, torch.tensor([[r[step]] for r in rows])], dim=1)
    return (time.perf_counter() - started) / steps * 1000


def decode_step_ms(loaded, steps: int = 16) -> float:
    """The model's decode step at batch 8 behind stage 2's prefix (a cached prefix copied per row)."""
    from selfalign.generation import Engine, SamplingParams
    from selfalign.principles import render_prefix, render_prompt

    principle_set = load_principle_set()
    engine = Engine.for_model(loaded, batch_size=8, progress=False)
    prompts = [render_prompt(principle_set, f"Question number {i}?") for i in range(8)]
    prefix = render_prefix(principle_set, "Watson")
    engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=2), shared_prefix=prefix)  # warm the cache
    timings = []
    for tokens in (2, 2 + steps):
        started = time.perf_counter()
        engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=tokens), shared_prefix=prefix)
        timings.append(time.perf_counter() - started)
    return (timings[1] - timings[0]) / steps * 1000


if __name__ == "__main__":
    main()
