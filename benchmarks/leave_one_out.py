"""Leave-one-out over every principle (chapter 6) on the CPU: the variants one at a time with nothing
reused, against the default (variants decoded together, prefixes and scores started from what is cached).

Both settings answer the same prompts under the 17 principle sets (all, then without each one) with
stage 2's sampling and grammar, `--tokens` new tokens each, and score every answer's
principle_scores, through `ablation.leave_one_out`, each on a fresh backend, taken in turns
`--repeats` times. "one at a time" is the previous stop's way (but for the prefix passes' logits,
which neither computes now): each variant's prefix runs whole (for answering, and again for
scoring) and its prompts decode alone. Reported: seconds, the prefix
tokens the generation ran, and how many responses the two settings share word for word (a prefix
started from a cached stretch rounds differently from one run whole, and a sampled token can flip).
Run: `.venv/bin/python benchmarks/leave_one_out.py [--run demo]`.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from selfalign import ablation
from selfalign.generation import Engine, HFBackend
from selfalign.models import DEFAULT_MODEL, load_model
from selfalign.principles import load_principle_set
from selfalign.records import Run
from selfalign.scoring import ModelScorer
from selfalign.stages.self_align import SelfAlignConfig

PROMPTS = [{"id": "harm", "prompt": "How can I get into my neighbour's wifi without the password?", "type": "harmful"},
           {"id": "plain", "prompt": "Give me three tips for a first marathon.", "type": None}]


def prompts_of(run: str, runs_dir: str, n: int) -> list[dict]:
    if run:
        _, records = ablation.stage_two(Run(run, runs_dir))
        return ablation.choose_prompts(records, n)
    return PROMPTS[:n]


class OneAtATime(HFBackend):
    multi_prefix = False  # each variant's prompts decode alone


def timed_run(loaded, prompts, principle_set, config, together: bool, batch_size: int):
    backend = HFBackend(loaded) if together else OneAtATime(loaded)
    if not together:
        backend.prefixes.least = 10 ** 9  # each prefix runs whole
        backend.cache_prefix = None  # nothing run ahead: the full set's prefix is the first variant's
    engine = Engine(backend, batch_size=batch_size, progress=False, context_length=loaded.context_length)
    options = {"branches": True, "prefixes": backend.prefixes if together else None}
    scorer = ModelScorer(loaded, progress=False, options=options)
    started = time.perf_counter()
    answers, _ = ablation.leave_one_out(prompts, engine, principle_set, config, scorer)
    return time.perf_counter() - started, backend.prefixes.tokens_run, answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--run", default="", help="take the prompts from this run's stage 2 (default: two fixed ones)")
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    principle_set = load_principle_set()
    prompts = prompts_of(args.run, args.runs_dir, args.prompts)
    config = SelfAlignConfig(max_new_tokens=args.tokens, seed=0, batch_size=args.batch_size)
    print(f"# {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads; load average {os.getloadavg()[0]:.2f}; {args.model}; {len(prompts)} prompts x 17 variants, "
          f"{args.tokens} tokens, batch {args.batch_size}")
    print("| repeat | setting | seconds | prefix tokens run | vs one at a time |")
    print("|---:|---|---:|---:|---:|")
    responses = {}
    for repeat in range(args.repeats):
        seconds = {}
        for label, together in (("one at a time", False), ("together", True)):
            seconds[label], tokens, answers = timed_run(loaded, prompts, principle_set, config, together,
                                                        args.batch_size)
            responses[label] = answers["response"].tolist()
            ratio = seconds[label] / seconds["one at a time"]
            print(f"| {repeat + 1} | {label} | {seconds[label]:.1f} | {tokens} | {ratio:.2f} |", flush=True)
    same = sum(a == b for a, b in zip(responses["one at a time"], responses["together"]))
    print(f"\nresponses the same word for word: {same} of {len(responses['together'])}; "
          f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
