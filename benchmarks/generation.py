"""Tokens per second of the generation engine on the embedded model, plain and behind stage 2's prefix.

Prints a markdown table, all in one run (these machines are noisy, so compare within it):
- plain prompts (the seed prompts, no prefix) at each batch size;
- the same prompts behind stage 2's real prefix (preamble, 16 principles, 5 exemplars), with the
  prefix's cache copied into every row (the path before shared-prefix attention) and shared
  (`selfalign/generation/shared_prefix.py`), each with its share of the plain throughput;
- how many prompts got the same text on the shared path as on the copied one (sampled, same seeds;
  the logits agree to float32 noise, so a near-tie in a long answer may go the other way).

Run: `.venv/bin/python benchmarks/generation.py [--backend hf-static] [--batch-sizes 1 8 16]`.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from selfalign.generation import Engine, HFBackend, SamplingParams
from selfalign.generation.shared_prefix import bytes_per_row
from selfalign.inputs import PRINCIPLES_DIR, load_prompts
from selfalign.models import DEFAULT_MODEL, load_model
from selfalign.principles import load_principle_set, render_prefix, render_prompt


def timed(backend, batch, prompts, params, shared_prefix=None):
    engine = Engine(backend, batch_size=batch, context_length=backend.loaded.context_length, progress=False)
    started = time.perf_counter()
    completions = engine.generate(prompts, params, shared_prefix=shared_prefix)
    seconds = time.perf_counter() - started
    return completions, sum(c.completion_tokens for c in completions) / seconds, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--backend", choices=["hf", "hf-static"], default="hf")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16])
    args = parser.parse_args()

    loaded = load_model(args.model)
    seeds = load_prompts(PRINCIPLES_DIR / "seed_prompts.jsonl")[: args.prompts]
    principle_set = load_principle_set()
    prefix = render_prefix(principle_set, "Watson")
    plain = [f"User: {row['prompt']}\n\nAssistant:" for row in seeds]
    behind = [render_prompt(principle_set, row["prompt"]) for row in seeds]
    prefix_tokens = len(loaded.tokenizer(prefix)["input_ids"])
    # No stop strings and no end of text, so that every setting decodes the same number of tokens.
    params = SamplingParams(temperature=0.7, top_p=0.95, max_new_tokens=args.new_tokens, seed=0,
                            logit_bias=((loaded.tokenizer.eos_token, -100.0),))
    static = args.backend == "hf-static"
    copied, shared = HFBackend(loaded, static=static, share_prefix=False), HFBackend(loaded, static=static)
    for backend in (copied, shared):  # the prefix's own cache is computed once a stage: not timed here
        backend._cached_prefix(prefix, backend._prefix_ids(prefix))
    print(f"model {args.model}, backend {args.backend}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, {platform.processor() or platform.machine()}, {len(seeds)} prompts, {args.new_tokens} new "
          f"tokens, prefix {prefix_tokens} tokens ({bytes_per_row(loaded.model, prefix_tokens) / 2**20:.0f} MiB "
          f"of keys and values a row; shared: once a batch)\n")
    print("| batch | plain tok/s | prefix copied tok/s | share of plain | prefix shared tok/s | share of plain "
          "| shared / copied | same text |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    for batch in args.batch_sizes:
        _, plain_rate, _ = timed(copied, batch, plain, params)
        copied_out, copied_rate, _ = timed(copied, batch, behind, params, prefix)
        shared_out, shared_rate, _ = timed(shared, batch, behind, params, prefix)
        print(f"| {batch} | {plain_rate:.1f} | {copied_rate:.1f} | {copied_rate / plain_rate:.0%} | "
              f"{shared_rate:.1f} | {shared_rate / plain_rate:.0%} | {shared_rate / copied_rate:.2f}x | "
              f"{sum(a == b for a, b in zip(shared_out, copied_out))}/{len(seeds)} |", flush=True)


if __name__ == "__main__":
    main()
