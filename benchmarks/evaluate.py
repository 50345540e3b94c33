"""TruthfulQA MC1 with the embedded model on CPU: the batched scorer against a one-pair-at-a-time loop.

Every row scores the same (prompt, answer) pairs: MC1's best answer and false answers after the QA
primer. The loop (`score_one_by_one`, one forward pass per pair, as the original TruthfulQA code
does) and the batched variants run on the first --subset questions; the loop's time for all
questions is extrapolated from its seconds per pair. The last row is the full MC1 run with the
default scorer, timed for real. Prints a markdown table; also the largest difference between the
batched and the looped log-likelihoods. Run: `.venv/bin/python benchmarks/evaluate.py`.

`--hhh N` adds a second table: stage 5's BIG-bench HHH (N seeded items, all three modes, the A/B
exam in the run's chat format) and the paper's TruthfulQA true/false exam (N questions), scored
with no sharing between contexts and with the default scorer, which runs every stretch that
contexts share once (a radix tree: the exam's instructions, then each dialogue under the two
orders of its replies), taken in turns `--repeats` times. It counts the tokens each setting feeds
the model (real and padded), so the saving shows whatever the machine's load.
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
    parser.add_argument("--data", default=str(ev.data_dir() / "truthfulqa.csv"))
    parser.add_argument("--subset", type=int, default=60, help="questions for the loop and the variants")
    parser.add_argument("--questions", type=int, default=0, help="questions in the full run (0: all)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--hhh", type=int, default=0, help="also HHH and the true/false exam on N items (0: not)")
    parser.add_argument("--hhh-data", default=str(ev.data_dir() / "hhh_alignment"))
    parser.add_argument("--repeats", type=int, default=2, help="turns of the HHH comparison")
    parser.add_argument("--skip-mc1", action="store_true", help="only the HHH comparison")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = load_model(args.model)
    if args.hhh:
        shared_stretches(loaded, args)
    if args.skip_mc1:
        return
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


def shared_stretches(loaded, args) -> None:
    """HHH and the true/false exam scored with and without sharing what contexts share."""
    from selfalign.chat_format import ChatFormat
    from selfalign.stages.evaluate import sample

    chat = ChatFormat.load()
    hhh = sample(ev.load_hhh(args.hhh_data), args.hhh, 0)
    questions = sample(ev.load_truthfulqa(args.data), args.hhh, 0)
    fed = {"real": 0, "padded": 0}
    forward = loaded.model.forward

    def counting(*positional, **keywords):
        ids, mask = keywords["input_ids"], keywords.get("attention_mask")
        fed["padded"] += ids.numel()
        fed["real"] += int(mask[:, -ids.shape[1]:].sum()) if mask is not None and mask.dim() == 2 else ids.numel()
        return forward(*positional, **keywords)

    loaded.model.forward = counting
    settings = {"no sharing between contexts": {"share_prefix": False}, "shared stretches once (default)": {}}
    measured = {label: [] for label in settings}
    answers = {}
    print(f"HHH: {len(hhh)} items, true/false exam: {len(questions)} questions; load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    for turn in range(args.repeats):
        for label, options in settings.items():
            scorer = scoring.ModelScorer(loaded, batch_size=16, progress=False,
                                         options={"max_batch_tokens": 2048, **options})
            fed.update(real=0, padded=0)
            (hhh_result, exam_result), seconds = timed(lambda scorer=scorer: (
                ev.hhh_eval(scorer, hhh, chat=chat), ev.truthfulqa_mc_paper(scorer, questions, chat=chat)))
            measured[label].append((seconds, fed["real"], fed["padded"]))
            answers[label] = hhh_result.items["pref_ab"].tolist() + exam_result.items["best_true_logodds"].tolist()
            print(f"  turn {turn}: {label}: {seconds:.1f} s", flush=True)
    loaded.model.forward = forward
    base = min(s for s, _, _ in measured["no sharing between contexts"])
    print("\n| scorer | tokens run (real) | with padding | seconds (each turn) | best vs no sharing |")
    print("|---|---:|---:|---|---:|")
    for label, runs in measured.items():
        best = min(s for s, _, _ in runs)
        print(f"| {label} | {runs[0][1]} | {runs[0][2]} | {', '.join(f'{s:.1f}' for s, _, _ in runs)} | "
              f"{base / best:.2f}x |")
    first, second = answers.values()
    print(f"\nlargest difference between the two settings' preferences and log-odds: "
          f"{max(abs(a - b) for a, b in zip(first, second)):.1e}; load average at end {os.getloadavg()[0]:.1f}\n")


if __name__ == "__main__":
    main()
