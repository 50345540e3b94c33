"""TruthfulQA MC1 with the embedded model on CPU: the batched scorer against a one-pair-at-a-time loop.

Every row scores the same (prompt, answer) pairs: MC1's best answer and false answers after the QA
primer. The loop (`score_one_by_one`, one forward pass per pair, as the original TruthfulQA code
does) and the batched variants run on the first --subset questions; the loop's time for all
questions is extrapolated from its seconds per pair. The last row is the full MC1 run with the
default scorer, timed for real. Prints a markdown table; also the largest difference between the
batched and the looped log-likelihoods. Run: `.venv/bin/python benchmarks/evaluate.py`.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from selfalign import evals as ev
from selfalign import scoring
from selfalign.models import DEFAULT_MODEL, load_model


def mc1_requests(questions, templates):
    return [(templates["truthfulqa_primer"] + templates["truthfulqa_question"].format(question=q.question), " " + a)
            for q in questions for a in (q.best, *q.incorrect)]


def timed(function):
    started = time.perf_counter()
    value = function()
    return value, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--data", default=str(ev.DATA_DIR / "truthfulqa.csv"))
    parser.add_argument("--subset", type=int, default=60, help="questions for the loop and the variants")
    parser.add_argument("--questions", type=int, default=0, help="questions in the full run (0: all)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = load_model(args.model)
    templates = ev.load_templates()
    questions = ev.load_truthfulqa(args.data)
    everything = questions[: args.questions or None]
    subset = mc1_requests(questions[: args.subset], templates)
    model, tokenizer = loaded.model, loaded.tokenizer
    print(f"model {args.model}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; load average at start "
          f"{os.getloadavg()[0]:.1f}; batch size {args.batch_size}\n", flush=True)

    looped, loop_seconds = timed(lambda: scoring.score_one_by_one(model, tokenizer, subset))
    per_pair = loop_seconds / len(subset)
    all_pairs = len(mc1_requests(everything, templates))
    rows = [("one pair at a time (loop)", args.subset, len(subset), loop_seconds)]
    worst = 0.0
    for label, options in [("batched, sorted by length only", {"share_prefix": False, "share_context": False}),
                           ("+ primer prefix computed once", {"share_context": False}),
                           ("+ each question's context once (default)", {})]:
        scores, seconds = timed(lambda options=options: scoring.score_choices(
            model, tokenizer, subset, batch_size=args.batch_size, progress=False, **options))
        worst = max(worst, max(abs(s.logprob - r.logprob) for s, r in zip(scores, looped)))
        rows.append((label, args.subset, len(subset), seconds))

    scorer = scoring.ModelScorer(loaded, batch_size=args.batch_size, progress=False)
    result, full_seconds = timed(lambda: ev.truthfulqa_mc(scorer, everything, with_mc2=False))

    print("| setting | questions | pairs | seconds | s per pair | all questions, s | vs loop |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, count, pairs, seconds in rows:
        estimate = seconds / pairs * all_pairs
        print(f"| {label} | {count} | {pairs} | {seconds:.1f} | {seconds / pairs:.3f} | "
              f"{estimate:.0f} (extrapolated) | {per_pair * pairs / seconds:.1f}x |")
    print(f"| full MC1 run, default scorer | {len(everything)} | {all_pairs} | {full_seconds:.1f} | "
          f"{full_seconds / all_pairs:.3f} | {full_seconds:.0f} (measured) | {per_pair * all_pairs / full_seconds:.1f}x |")
    print(f"\nMC1 = {result.summary.set_index('metric').loc['mc1', 'value']:.3f} on {len(everything)} questions; "
          f"largest |batched - loop| log-likelihood on the subset: {worst:.1e}; "
          f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
