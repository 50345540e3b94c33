"""Tokens per second of the generation engine on the embedded model, by batch size.

Prints a markdown table: the same prompts answered at batch 1, 4 and 16 (sampling, 48 new tokens),
then the same prompts behind a long shared prefix with and without the prefix cache (what stage 2
does with its principles and exemplars). Run: `.venv/bin/python benchmarks/generation.py`.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from selfalign.generation import Engine, SamplingParams
from selfalign.models import DEFAULT_MODEL, load_model
from selfalign.inputs import PRINCIPLES_DIR, load_prompts


def timed(engine, prompts, params, shared_prefix=None):
    started = time.perf_counter()
    completions = engine.generate(prompts, params, shared_prefix=shared_prefix)
    seconds = time.perf_counter() - started
    return sum(c.completion_tokens for c in completions), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--prefix-prompts", type=int, default=8, help="prompts in the shared-prefix rows (0: skip)")
    args = parser.parse_args()

    loaded = load_model(args.model)
    seeds = load_prompts(PRINCIPLES_DIR / "seed_prompts.jsonl")
    prompts = [f"User: {row['prompt']}\n\nAssistant:" for row in seeds[: args.prompts]]
    params = SamplingParams(temperature=0.7, top_p=0.95, max_new_tokens=args.new_tokens, seed=0)
    print(f"model {args.model}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, {len(prompts)} prompts, {args.new_tokens} new tokens\n")
    print("| setting | batch | new tokens | seconds | tokens/s | vs batch 1 |")
    print("|---|---:|---:|---:|---:|---:|")
    base = None
    for batch in args.batch_sizes:
        tokens, seconds = timed(Engine.for_model(loaded, batch_size=batch, progress=False), prompts, params)
        rate = tokens / seconds
        base = base or rate
        print(f"| plain prompts | {batch} | {tokens} | {seconds:.1f} | {rate:.1f} | {rate / base:.1f}x |", flush=True)

    if args.prefix_prompts:
        prefix = "\n".join(f"User: {r['prompt']}\nAssistant: I will answer that." for r in seeds) + "\n"
        prefix_tokens = len(loaded.tokenizer(prefix)["input_ids"])
        batch = args.prefix_prompts
        long_prompts = [prefix + p for p in prompts[:batch]]
        engine = Engine.for_model(loaded, batch_size=batch, progress=False)
        for label, shared in [("shared prefix, recomputed", None), ("shared prefix, cached", prefix)]:
            engine.backend._prefix_cache.clear()  # each row pays its own prefix computation once
            tokens, seconds = timed(engine, long_prompts, params, shared_prefix=shared)
            print(f"| {label} ({prefix_tokens} tokens) | {batch} | {tokens} | {seconds:.1f} | "
                  f"{tokens / seconds:.1f} | |", flush=True)


if __name__ == "__main__":
    main()
