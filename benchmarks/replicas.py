"""Stage 2's wall time in one process and on Ray replicas of the model, in one run.

Runs stage 2 (self-align, its defaults: constrained format, principle scores) on the same prompts
in each configuration, each into a fresh run directory, and times two parts: `start` (building the
engine: loading the model, or starting Ray and the replicas, which load it each) and `stage` (the
stage with that engine: generation, then the principle scores, which the driver computes itself,
loading the model once more when replicas generate).

Configurations: one process with torch's default threads (every core: what `replicas 1` runs),
one process with one thread (what each replica computes with), and N replicas of one core and one
thread each. Ray runs its workers at niceness 15 by default, behind every other process on a
shared machine; this benchmark starts its local Ray with RAY_worker_niceness=0, so that the
replicas compete for the cores on the terms the one-process runs do. Prints a markdown table with
each row's ratios to the first two, and whether its calls.jsonl is byte for byte the first row's.
On a machine with as many cores as replicas the ratio to one thread shows the overhead.
Run: `.venv/bin/python benchmarks/replicas.py` (needs the ray extra).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4, help="the default (16) would make 8 prompts one batch")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    os.environ.setdefault("RAY_worker_niceness", "0")  # read when the local Ray starts

    import ray
    import torch
    import transformers

    from selfalign.generation import engine_for
    from selfalign.inputs import PRINCIPLES_DIR
    from selfalign.stages import self_align

    cores = torch.get_num_threads()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}, ray {ray.__version__}; "
          f"model {args.model}, {args.prompts} prompts, batch {args.batch_size}")
    plan = [(n, t) for n in args.replicas for t in ((cores, 1) if n == 1 and cores > 1 else (1,))]
    rows, reference = [], None
    with tempfile.TemporaryDirectory() as runs:
        for count, threads in plan:
            name = f"r{count}t{threads}"
            config = self_align.SelfAlignConfig(run=name, runs_dir=runs, model=args.model,
                                                prompts=str(PRINCIPLES_DIR / "seed_prompts.jsonl"),
                                                limit=args.prompts, batch_size=args.batch_size, replicas=count)
            torch.set_num_threads(threads if count == 1 else cores)  # replicas set their own (one each)
            started = time.perf_counter()
            engine = engine_for(config, progress=False)  # with replicas: starts Ray (once) and the replicas
            built = time.perf_counter()
            manifest = self_align.run(config, engine=engine)
            finished = time.perf_counter()
            if count > 1:
                engine.backend.close()
            del engine
            calls = (Path(runs) / name / "self_align" / "calls.jsonl").read_bytes()
            reference = reference if reference is not None else calls
            rows.append({"replicas": count, "threads": threads, "start_s": built - started,
                         "stage_s": finished - built, "total_s": finished - started,
                         "responses": manifest["counts"]["responses"], "same_calls": calls == reference})
    torch.set_num_threads(cores)
    first, single = rows[0], rows[min(1, len(rows) - 1)]
    print(f"\n| replicas | threads each | start (s) | stage (s) | total (s) | total / row 1 | total / row 2 | "
          "responses | calls.jsonl as row 1's |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for row in rows:
        print(f"| {row['replicas']} | {row['threads']} | {row['start_s']:.1f} | {row['stage_s']:.1f} | "
              f"{row['total_s']:.1f} | {row['total_s'] / first['total_s']:.2f} | "
              f"{row['total_s'] / single['total_s']:.2f} | {row['responses']} | "
              f"{'same' if row['same_calls'] else 'differs'} |")


if __name__ == "__main__":
    main()
