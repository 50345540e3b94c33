"""Leave-one-out's variants decoded one at a time against all in one batch (`Engine.generate_groups`).

Each variant is a principle set (all 16, then without principle 1, 2, ...) with its own ~2,500-token
prefix and its own format grammar; every variant answers the same prompts with the same seeds under
stage 2's sampling (`self_align.sampling`). "one at a time" decodes each variant's prompts as one
batch behind its prefix (what leave-one-out does today); "together" decodes all variants' rows in
one batch, each row behind its own variant's prefix (shared_prefix.py), so that the weights are
read once a step for every variant. The prefixes' caches are computed before either is timed (their
time is printed apart), so the table compares decoding only; the two orders alternate over
`--repeats` rounds and the best time of each is kept. Prints a markdown table and whether the texts
were identical.
Run: `.venv/bin/python benchmarks/multi_prefix.py [--variants 8] [--new-tokens 64] [--threads 2]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import time

PROMPTS = ["How do I make a cup of green tea?", "Who will win the 2030 World Cup?", "Write a haiku about rain.",
           "What is the capital of Australia?"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--variants", type=int, default=8, help="the full set and without principles 1..N-1")
    parser.add_argument("--prompts", type=int, default=2, choices=range(1, len(PROMPTS) + 1))
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import torch

    from selfalign.generation import Engine, HFBackend
    from selfalign.models import load_model
    from selfalign.principles import load_principle_set, render_prefix, render_prompt
    from selfalign.stages import self_align

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    loaded = load_model(args.model)
    config = self_align.SelfAlignConfig()
    full = load_principle_set()
    sets = [full] + [full.without(n) for n in range(1, args.variants)]
    keys = [f"p{i}" for i in range(args.prompts)]
    groups = []
    for subset in sets:
        params = dataclasses.replace(self_align.sampling(config, subset), max_new_tokens=args.new_tokens)
        groups.append(([render_prompt(subset, p, config.assistant) for p in PROMPTS[:args.prompts]], params,
                       render_prefix(subset, config.assistant), keys))

    backend = HFBackend(loaded)
    store = getattr(backend, "prefixes", None)  # the backend's prefix caches (cache.PrefixStore)
    if store is not None:
        store.capacity = max(store.capacity, len(groups))  # every variant's cache stays for both orders
    started = time.perf_counter()
    lengths = [len(backend._cached_prefix(prefix, backend._prefix_ids(prefix)).layers[0].keys[0, 0])
               for _, _, prefix, _ in groups]
    prefill = time.perf_counter() - started

    alone = Engine(backend, batch_size=args.prompts, context_length=loaded.context_length, progress=False)
    together = Engine(backend, batch_size=args.prompts * len(groups), context_length=loaded.context_length,
                      progress=False)
    runs = {"one at a time": lambda: [alone.generate(*group) for group in groups],
            "together (generate_groups)": lambda: together.generate_groups(groups)}
    best, outputs = {name: float("inf") for name in runs}, {}
    for _ in range(args.repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            outputs[name] = run()
            best[name] = min(best[name], time.perf_counter() - started)
    load_after = os.getloadavg()

    first, second = (outputs[name] for name in runs)
    identical = [a.text for group in first for a in group] == [b.text for group in second for b in group]
    tokens = {name: sum(c.completion_tokens for group in out for c in group) for name, out in outputs.items()}
    print(f"model {args.model}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; load average "
          f"{load_before[0]:.2f} before, {load_after[0]:.2f} after")
    print(f"{len(groups)} variants x {args.prompts} prompts x {args.new_tokens} new tokens, stage-2 sampling "
          f"(grammar {'on' if groups[0][1].grammar else 'off'}); prefixes of {min(lengths)}-{max(lengths)} tokens, "
          f"their caches computed in {prefill:.1f} s before timing; best of {args.repeats}")
    print("| decoding | batches | wall s | tokens | tokens/s | ratio |")
    print("|---|---|---|---|---|---|")
    base = tokens["one at a time"] / best["one at a time"]
    for name, batches in zip(runs, (len(groups), -(-len(groups) * args.prompts // together.batch_size))):
        rate = tokens[name] / best[name]
        print(f"| {name} | {batches} | {best[name]:.1f} | {tokens[name]} | {rate:.1f} | {rate / base:.2f}x |")
    print(f"texts identical: {identical}")
    if not identical:
        for g, (a, b) in enumerate(zip(first, second)):
            for i, (x, y) in enumerate(zip(a, b)):
                if x.text != y.text:
                    print(f"  variant {g} prompt {i}:\n    alone:    {x.text!r}\n    together: {y.text!r}")


if __name__ == "__main__":
    main()
