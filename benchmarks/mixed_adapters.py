"""Several models answering the same prompts: one model after another, against every model's rows in
one batch, each through its own LoRA adapter (`training.adapters_for_generation`).

The workload is chapter 3's and 4's comparison (`engrave.side_by_side`): a run's held-out prompts,
greedy, in the training format, from the base model and the run's adapters. "one at a time" is the
previous way: the base model's batch, then each adapter merged into the weights and its own batch.
"together" is what `side_by_side` does now. Reported: seconds for each, taken in turns `--repeats`
times, and whether the two gave the same answers.
Run after `make run`: `.venv/bin/python benchmarks/mixed_adapters.py [--run demo]`.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import pandas as pd
import torch

from selfalign.chat_format import ChatFormat
from selfalign.generation import Engine, SamplingParams
from selfalign.models import DEFAULT_MODEL, load_model
from selfalign.records import Run
from selfalign.stages import engrave
from selfalign.training import adapted_for_generation


def one_at_a_time(loaded, prompts, adapters, chat, max_new_tokens):
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, stop=(chat.stop,))
    texts = [chat.prompt(p) for p in prompts]
    table = pd.DataFrame({"prompt": prompts})
    table["base"] = [c.text.strip() for c in Engine.for_model(loaded, progress=False).generate(texts, params)]
    for name, directory in adapters.items():
        with adapted_for_generation(loaded, directory) as adapted:
            table[name] = [c.text.strip() for c in Engine.for_model(adapted, progress=False).generate(texts, params)]
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="demo")
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--prompts", type=int, default=2, help="held-out prompts (the chapters' sample_prompts)")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per answer (the chapters' default)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    run = Run(args.run, args.runs_dir)
    data = engrave.tables(args.run, args.runs_dir)["data"]
    prompts = data[data["split"] == "holdout"]["prompt"].head(args.prompts).tolist()
    loaded = load_model(DEFAULT_MODEL)
    chat = ChatFormat.load()
    cases = {"chapter 3 (base, engraved)": {"engraved": run.stage("engrave").adapter},
             "chapter 4 (base, engraved, verbose)": {"engraved": run.stage("engrave").adapter,
                                                     "verbose": run.stage("verbose").adapter}}
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {len(prompts)} prompts, {args.tokens} tokens")
    print("| case | one at a time | together | ratio | same answers |")
    print("|---|---:|---:|---:|---|")
    for _ in range(args.repeats):
        for case, adapters in cases.items():
            start = time.perf_counter()
            before = one_at_a_time(loaded, prompts, adapters, chat, args.tokens)
            alone = time.perf_counter() - start
            start = time.perf_counter()
            after = engrave.side_by_side(loaded, prompts, adapters, chat, args.tokens)
            together = time.perf_counter() - start
            print(f"| {case} | {alone:.1f} s | {together:.1f} s | {together / alone:.2f}x | {before.equals(after)} |",
                  flush=True)


if __name__ == "__main__":
    main()
