"""QLoRA on the CPU: LoRA training steps on a 4-bit NF4 base (bitsandbytes) beside the float32 base.

Variants, each loaded the way stage 3 loads it (`selfalign.training.load_for_training`) and trained
by its loop (`train_lora`) on the same examples, batches and seed:

    float32     the plain base (what stage 3 trains on the CPU by default)
    4bit        --quantize 4bit: NF4 weights, double-quantized, computing in bfloat16 (QLoRA's, the default)
    4bit-fp32   the same, computing in float32 (`load_model(..., quantize="4bit", dtype="float32")`)
    4bit-gc     4bit with --gradient-checkpointing

The examples are tests/data/responses.jsonl (12 stage-2 answers of the embedded model) built as
stage 3 builds them, micro-batches of 4. Each variant runs in its own process, so that its peak
resident memory is its own, and the variants take turns, `--repeats` times: the machine is shared,
so compare variants of one run by their ratio, not with another run's seconds.

Reported per variant: the model's weights (transformers' memory footprint), the peak resident set
size of the process after loading and after training (ru_maxrss, which includes torch and the
tokenizer), the CPU seconds the process spent per optimizer step (user + system over the whole
training call, first step included: with one thread this is the work, and other processes on the
machine change it far less than the wall time), the median wall seconds per step after the first,
steps/s by CPU time and its ratio to float32, and the first step's loss (what the 4-bit rounding
costs the base before any training).

    .venv/bin/python benchmarks/qlora_cpu.py [--model smollm2-135m-instruct] [--steps 6] [--repeats 2]
        [--threads 1] [--variants float32 4bit ...] [--out benchmarks/results/qlora_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
VARIANTS = ("float32", "4bit", "4bit-fp32", "4bit-gc")


def child(variant: str, model: str, steps: int, threads: int) -> dict:
    """One variant in this process: load, train `steps` optimizer steps, measure."""
    import resource

    import torch

    torch.set_num_threads(threads)
    from selfalign.chat_format import ChatFormat
    from selfalign.models import load_model
    from selfalign.training import TrainSettings, build_examples, load_for_training, train_lora

    def peak_mib() -> float:
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux

    before = peak_mib()
    rows = [json.loads(line) for line in (REPO / "tests" / "data" / "responses.jsonl").read_text().splitlines()]
    records = [{"id": r["id"], "prompt": r["prompt"], "answer": r["answer"]} for r in rows]
    quantize = "" if variant == "float32" else "4bit"
    # The same micro-batches in every variant: enough epochs over the 12 examples for `steps` steps.
    settings = TrainSettings(quantize=quantize, gradient_checkpointing=variant == "4bit-gc", warmup_steps=0,
                             micro_batch_size=4, epochs=math.ceil(steps * 4 / len(records)), checkpoint_every=1000)
    if variant == "4bit-fp32":  # the stage has no dtype setting; the loader's dtype is the compute dtype
        loaded = load_model(model, quantize="4bit", dtype="float32")
    else:
        loaded = load_for_training(model, settings)
    after_load = peak_mib()
    examples, _ = build_examples(records, loaded, ChatFormat.load(), settings.cutoff)
    with tempfile.TemporaryDirectory() as out:
        cpu = _cpu_seconds()
        train_lora(loaded, examples, settings, out, progress=False)
        cpu = _cpu_seconds() - cpu
        log = [json.loads(line) for line in (Path(out) / "loss.jsonl").read_text().splitlines()]
    timed = [row["seconds"] for row in log[1:]] or [log[0]["seconds"]]
    return {"variant": variant, "weights_mib": round(loaded.model.get_memory_footprint() / 2**20, 1),
            "rss_before_load_mib": before, "peak_rss_after_load_mib": after_load, "peak_rss_mib": peak_mib(),
            "steps": len(log), "step_seconds": [row["seconds"] for row in log],
            "median_step_seconds": statistics.median(timed), "cpu_seconds_per_step": cpu / len(log),
            "tokens_per_step": statistics.mean(row["sequence_tokens"] for row in log),
            "first_loss": log[0]["loss"], "last_loss": log[-1]["loss"],
            "compute_dtype": _compute_dtype(loaded.model)}


def _cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _compute_dtype(model) -> str:
    for module in model.modules():
        if hasattr(module, "compute_dtype") and module.compute_dtype is not None:
            return str(module.compute_dtype).replace("torch.", "")
    return str(next(model.parameters()).dtype).replace("torch.", "")


def versions() -> dict:
    from importlib.metadata import version

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    flags = Path("/proc/cpuinfo").read_text()
    return {"cpu": cpu, "cores": os.cpu_count(), "avx512_bf16": "avx512_bf16" in flags,
            "python": platform.python_version(),
            **{name: version(name) for name in ("torch", "bitsandbytes", "transformers", "peft", "accelerate")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--out", default="")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model, args.steps, args.threads)))
        return

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    runs: dict[str, list[dict]] = {v: [] for v in args.variants}
    for repeat in range(args.repeats):
        for variant in args.variants:  # in turns, so that a busy minute on the machine hits all of them
            command = [sys.executable, __file__, "--child", variant, "--model", args.model,
                       "--steps", str(args.steps), "--threads", str(args.threads)]
            done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
            if done.returncode != 0:
                sys.exit(f"{variant} failed:\n{done.stderr[-3000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            runs[variant].append(result)
            print(f"repeat {repeat + 1} {variant}: {result['cpu_seconds_per_step']:.2f} CPU s/step, "
                  f"{result['median_step_seconds']:.2f} s/step, peak {result['peak_rss_mib']:.0f} MiB",
                  file=sys.stderr, flush=True)

    machine = versions()
    print(f"{machine['cpu']}, {machine['cores']} cores (AVX512-BF16: {machine['avx512_bf16']}), {args.threads} torch "
          f"thread(s); torch {machine['torch']}, bitsandbytes {machine['bitsandbytes']}, transformers "
          f"{machine['transformers']}, peft {machine['peft']}; model {args.model}, {args.steps} steps of 4 examples, "
          f"{args.repeats} repeats (medians)\n")
    base = statistics.median(r["cpu_seconds_per_step"] for r in runs["float32"]) if "float32" in runs else None
    print("| variant | compute | weights MiB | peak RSS after load MiB | peak RSS MiB | CPU s/step | steps/s (CPU) "
          "| vs float32 | wall s/step | first-step loss |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    summary = {}
    for variant, results in runs.items():
        cpu = statistics.median(r["cpu_seconds_per_step"] for r in results)
        wall = statistics.median(r["median_step_seconds"] for r in results)
        row = {"compute": results[0]["compute_dtype"], "weights_mib": results[0]["weights_mib"],
               "peak_rss_after_load_mib": statistics.median(r["peak_rss_after_load_mib"] for r in results),
               "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in results),
               "cpu_seconds_per_step": round(cpu, 3), "steps_per_cpu_second": round(1 / cpu, 3),
               "speed_vs_float32": round(base / cpu, 2) if base else None, "wall_seconds_per_step": round(wall, 3),
               "first_loss": results[0]["first_loss"]}
        summary[variant] = row
        print(f"| {variant} | {row['compute']} | {row['weights_mib']:.1f} | {row['peak_rss_after_load_mib']:.0f} "
              f"| {row['peak_rss_mib']:.0f} | {cpu:.2f} | {1 / cpu:.3f} | "
              f"{row['speed_vs_float32'] if base else '-'}x | {wall:.2f} | {row['first_loss']:.3f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": machine, "settings": vars(args), "summary": summary,
                                              "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
