"""Stages 3-4 on a GPU: a correctness run and a LoRA training throughput.

1. `stages`: engrave then verbose cloning on the tiny random model, on the GPU (bf16 autocast),
   through the same stage functions as on the CPU; prints their counts.
2. `throughput`: the real training loop (`selfalign.training.train_lora`) on a LLaMA-7B-shaped model
   with random weights in bf16 (nothing downloaded): LoRA r=16 on q/k/v/o, micro-batches of
   4 x 512 tokens, with and without gradient checkpointing. Reports tokens/s and the model FLOPs
   utilisation, counting a LoRA step as 4N FLOPs per token (forward 2N plus the backward pass
   through the frozen weights for activation gradients, 2N; no weight gradients for them), over
   the card's dense bf16 peak given by --peak-tflops.

Needs only torch, transformers, peft and accelerate besides this repository (the GPU machines
have nothing else). `--tiny` runs a small shape on the CPU in seconds, to test the script.

    python benchmarks/train_gpu.py [--tiny] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def stages_check(tmp: Path) -> dict:
    from selfalign.models import load_model
    from selfalign.stages import engrave, verbose

    responses = tmp / "responses.jsonl"
    responses.write_text("".join(json.dumps({"id": f"r{i:02}", "prompt": f"What is {i} plus {i}?",
                                             "answer": f"Watson thinks {i} plus {i} is {2 * i}."}) + "\n"
                                 for i in range(16)))
    loaded = load_model("tiny-random")
    loaded.model.to("cuda" if _cuda() else "cpu")
    common = dict(run="gpu", runs_dir=str(tmp / "runs"), model="tiny-random", epochs=2)
    started = time.perf_counter()
    first = engrave.run(engrave.EngraveConfig(**common, responses=str(responses)), loaded=loaded)
    second = verbose.run(verbose.VerboseConfig(**common, max_new_tokens=24, min_examples=1), loaded=loaded)
    leftover = [n for n, _ in loaded.model.named_parameters() if "lora" in n]
    return {"engrave": first["counts"], "verbose": second["counts"], "seconds": round(time.perf_counter() - started, 1),
            "device": str(next(loaded.model.parameters()).device), "lora_left_in_base": len(leftover)}


def throughput(tmp: Path, tiny: bool, checkpointing: bool, steps: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from selfalign.models import LoadedModel, tiny_random_model
    from selfalign.training import Example, TrainSettings, train_lora

    shape = (dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4)
             if tiny else dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32))
    config = LlamaConfig(vocab_size=32000, max_position_embeddings=2048, num_key_value_heads=shape["num_attention_heads"],
                         **shape)
    device = "cuda" if _cuda() else "cpu"
    dtype = torch.bfloat16 if _cuda() else torch.float32
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    _, tokenizer = tiny_random_model()  # only its pad id and save_pretrained are used
    loaded = LoadedModel(model, tokenizer, "llama-7b-shape" if not tiny else "tiny-shape", None)
    n_params = sum(p.numel() for p in model.parameters())
    micro, length, answer = 4, 512, 256
    generator = torch.Generator().manual_seed(0)
    examples = []
    for i in range(micro * steps):
        ids = torch.randint(3, 32000, (length,), generator=generator).tolist()
        examples.append(Example(f"x{i}", ids, [-100] * (length - answer) + ids[-answer:]))
    settings = TrainSettings(epochs=1, micro_batch_size=micro, warmup_steps=0, checkpoint_every=10_000,
                             gradient_checkpointing=checkpointing)
    if _cuda():
        torch.cuda.reset_peak_memory_stats()
    out = tmp / f"throughput-{int(checkpointing)}"
    train_lora(loaded, examples, settings, out, progress=False)
    log = [json.loads(line) for line in (out / "loss.jsonl").read_text().splitlines()]
    timed = log[2:] if len(log) > 3 else log  # the first steps warm up kernels and the allocator
    seconds = sum(r["seconds"] for r in timed)
    tokens = sum(r["sequence_tokens"] for r in timed)
    result = {"params": n_params, "micro_batch": micro, "sequence": length, "gradient_checkpointing": checkpointing,
              "steps_timed": len(timed), "tokens_per_s": round(tokens / seconds, 1),
              "seconds_per_step": round(seconds / len(timed), 3),
              "train_flops_per_s": 4 * n_params * tokens / seconds,
              "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if _cuda() else None,
              "first_loss": log[0]["loss"], "last_loss": log[-1]["loss"]}
    del model, loaded
    if _cuda():
        torch.cuda.empty_cache()
    return result


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a small shape (runs on a CPU in seconds)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="dense bf16 peak of the card (H100/H200 SXM: 989)")
    parser.add_argument("--parts", default="stages,throughput")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    import peft
    import torch
    import transformers

    results = {"device": torch.cuda.get_device_name() if _cuda() else "cpu", "torch": torch.__version__,
               "transformers": transformers.__version__, "peft": peft.__version__, "peak_tflops": args.peak_tflops}
    print(json.dumps(results), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        parts = args.parts.split(",")
        if "stages" in parts:
            try:
                results["stages"] = stages_check(tmp)
            except Exception:  # report and go on: the other part is worth having alone
                results["stages"] = {"error": traceback.format_exc(limit=6)}
            print(json.dumps({"stages": results["stages"]}), flush=True)
        if "throughput" in parts:
            rows = []
            for checkpointing in (False, True):
                try:
                    row = throughput(tmp, args.tiny, checkpointing, args.steps)
                    row["mfu_percent"] = round(100 * row["train_flops_per_s"] / (args.peak_tflops * 1e12), 1)
                except Exception:
                    row = {"gradient_checkpointing": checkpointing, "error": traceback.format_exc(limit=6)}
                rows.append(row)
                print(json.dumps(row), flush=True)
            results["throughput"] = rows
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print("\n| gradient checkpointing | tokens/s | s/step | MFU % | peak memory GB | loss first -> last |")
    print("|---|---|---|---|---|---|")
    for row in results.get("throughput", []):
        if "error" not in row:
            print(f"| {row['gradient_checkpointing']} | {row['tokens_per_s']} | {row['seconds_per_step']} | "
                  f"{row['mfu_percent']} | {row['peak_memory_gb']} | {row['first_loss']:.3f} -> {row['last_loss']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
