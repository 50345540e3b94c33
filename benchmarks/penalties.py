"""What stage 4's repetition controls cost: transformers' own (over prompt and output) against ours
(over the generated tokens only, `selfalign.generation.processors`), and no controls, in one run.

The same batch of teacher prompts (stage 4's format, verbose instruction) is decoded with
`model.generate` under each set of logits processors, in turns, several rounds; prints a markdown
table of tokens/s and the ratio to no controls. Sampled texts differ between the rows (the
controls differ), so only speed is compared. Run: `.venv/bin/python benchmarks/penalties.py`.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from transformers import LogitsProcessorList

from selfalign.chat_format import ChatFormat, read_instruction
from selfalign.generation import prompt_seed
from selfalign.generation.processors import GeneratedNoRepeatNGram, GeneratedRepetitionPenalty
from selfalign.generation.sampler import NucleusSampler
from selfalign.models import DEFAULT_MODEL, load_model
from selfalign.inputs import PRINCIPLES_DIR, load_prompts


def decode(loaded, input_ids, mask, new_tokens, seeds, ours: bool | None) -> tuple[int, float]:
    width = input_ids.shape[1]
    processors = LogitsProcessorList()
    kwargs = dict(repetition_penalty=1.0, no_repeat_ngram_size=0)
    if ours:
        processors += [GeneratedRepetitionPenalty(1.1, width), GeneratedNoRepeatNGram(6, width)]
    elif ours is False:
        kwargs = dict(repetition_penalty=1.1, no_repeat_ngram_size=6)
    processors.append(NucleusSampler(0.3, 0.7, seeds, input_ids.device))
    started = time.perf_counter()
    with torch.inference_mode():
        out = loaded.model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new_tokens,
                                    min_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None,
                                    top_k=None, pad_token_id=loaded.tokenizer.pad_token_id,
                                    logits_processor=processors, **kwargs)
    return (out.shape[1] - width) * out.shape[0], time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    loaded = load_model(args.model)
    chat, instruction = ChatFormat.load(), read_instruction()
    texts = [chat.prompt(row["prompt"], instruction=instruction)
             for row in load_prompts(PRINCIPLES_DIR / "seed_prompts.jsonl")[: args.prompts]]
    encoded = [loaded.tokenizer(loaded.bos_prefix + t)["input_ids"] for t in texts]
    width = max(map(len, encoded))
    pad = loaded.tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    seeds = [prompt_seed(0, i) for i in range(len(texts))]
    rows = {"no repetition controls": None, "transformers' (prompt + output)": False, "ours (generated only)": True}
    totals = {name: [0, 0.0] for name in rows}
    decode(loaded, input_ids, mask, 8, seeds, None)  # warm-up
    for _ in range(args.rounds):
        for name, ours in rows.items():  # in turns, so that a slow spell of the machine hits all rows
            tokens, seconds = decode(loaded, input_ids, mask, args.new_tokens, seeds, ours)
            totals[name][0] += tokens
            totals[name][1] += seconds
    print(f"{loaded.name}, batch {len(texts)} x {width} prompt tokens, {args.new_tokens} new tokens, "
          f"{args.rounds} rounds; {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    print("| repetition penalty 1.1 + no repeated 6-gram | tokens/s | vs none |\n|---|---:|---:|")
    base = totals["no repetition controls"][0] / totals["no repetition controls"][1]
    for name, (tokens, seconds) in totals.items():
        print(f"| {name} | {tokens / seconds:.1f} | {tokens / seconds / base:.2f} |")


if __name__ == "__main__":
    main()
