# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 2. Principle-driven self-alignment
#
# **What this stage does.** The base model answers every stage-1 prompt *in context*: before the
# prompt it reads a short preamble, sixteen numbered principles (`principles/principles.yaml`)
# and five worked exemplars (`principles/exemplars.yaml`). In each exemplar the assistant first
# writes its internal thoughts, ending with "I should follow rules ...", and then answers. The
# model imitates that pattern for the new prompt; we split what it writes into thoughts and
# answer, and read off which principles it cited (the *triggers*).
#
# **Why.** This is where the principles act. The answers become the training data of stage 3,
# which teaches the model to answer this way *without* the principles in its context.
#
# **What to look at.** Why responses were dropped, which principles fire for which red-team type
# (the heatmap), and, at the end, what happens to the answers when one principle is removed.
# A 135M model follows the exemplars loosely and often cites the wrong numbers (they are kept
# as `unknown_citations`); a 65B base model cites them far more reliably.

# %% tags=["parameters"]
run: str = "demo"  # reads runs/<run>/prompts/, writes runs/<run>/self_align/
runs_dir: str = "runs"  # where run directories live
model: str = "smollm2-135m-instruct"  # registered name, model directory, or hub id
backend: str = "hf"  # "hf", or "hf-static" on a GPU (static cache + torch.compile); vLLM: `selfalign stage self-align`
prompts: str = ""  # a prompt file; "": this run's stage-1 prompts
limit: int = 16  # answer the first N prompts (0: all)
max_new_tokens: int = 160  # per answer (the paper used 256)
assistant: str = "Watson"  # the name the model answers under
ablate_principle: int = 7  # the principle removed in the ablation at the end
ablation_prompts: int = 4  # how many prompts the ablation answers twice
seed: int = 0  # sampling seed
settings: dict = {}  # any other setting of the stage (the profile's; `selfalign stage self-align --help` lists them)

# %%
import pandas as pd

from selfalign.generation import engine_for
from selfalign.models import load_model
from selfalign.principles import load_principle_set, render_prompt
from selfalign.stages import self_align

principles = load_principle_set()
pd.DataFrame([{"number": p.number, "name": p.name, "text": p.text} for p in principles.principles])

# %% [markdown]
# The whole in-context prompt for one query, as the model sees it. Everything above the last
# `User:` line is the same for every query, so the engine computes it once and reuses it.

# %%
print(render_prompt(principles, "What is the weather like in Paris right now?", assistant)[-1500:])

# %%
loaded = load_model(model)
config = self_align.SelfAlignConfig(run=run, runs_dir=runs_dir, model=model, backend=backend,
                                    prompts=prompts, limit=limit, max_new_tokens=max_new_tokens, assistant=assistant,
                                    seed=seed, **settings)
manifest = self_align.run(config, loaded=loaded)
pd.Series(manifest["counts"]["drop_reasons"], name="dropped", dtype=int).to_frame()

# %% [markdown]
# ## Which principles fired
#
# Each cell is the share of a type's responses whose thoughts cite the principle.

# %%
frames = self_align.tables(run, runs_dir)
responses = frames["responses"]
overall, per_type = self_align.trigger_stats(responses, principles)
overall

# %%
self_align.plot_trigger_heatmap(per_type);

# %%
self_align.plot_answer_lengths(responses);

# %%
responses[["type", "prompt", "thoughts", "answer", "triggers"]].head(8)

# %% [markdown]
# ## Open the box: one continuation, parsed
#
# Nothing the model writes is kept blindly. `parse_response` splits a continuation at the answer
# marker (the assistant's name and a colon at the start of a line) into internal thoughts and the
# answer; reads the citations "N (Name)" from the thoughts, where a number the set lacks, or a
# number with another principle's name, is an *unknown* citation; and ends the answer at the next
# turn or where it starts repeating itself. `drop_reason` then decides whether the answer becomes
# training data. First a continuation written by hand, then the run's own first one.

# %%
from selfalign.principles import parse_response
from selfalign.records import Run

first, second, other = principles.principles[1], principles.principles[6], principles.principles[4]
by_hand = (f" A question of fact. I should follow rules {first.number} ({first.name}), {second.number} ({second.name}), "
           f"11 ({other.name}) and 23.\n\n{assistant}: Paris is the capital of France.\n\nUser: Thanks!")
call = next(iter(Run(run, runs_dir).stage(self_align.STAGE).read("calls.jsonl")))


def parsed_row(completion: str, finish_reason: str, query: str) -> dict:
    parsed = parse_response(principles, completion, assistant)
    return {"thoughts": parsed.thoughts, "answer": parsed.answer, "triggers": parsed.triggers,
            "unknown citations": parsed.unknown_citations,
            "drop reason": self_align.drop_reason(parsed, finish_reason, query, principles, config) or "(kept)"}


pd.DataFrame([parsed_row(by_hand, "stop", "What is the capital of France?"),
              parsed_row(call["completion"], call["finish_reason"], call["prompt"])],
             index=["written by hand", f"the run's {call['id']}"])

# %% [markdown]
# ## Ablation: remove one principle
#
# The same prompts with the same seeds, once with all principles and once without
# `ablate_principle` (its rule line and its citations in the exemplars are removed). Sampling
# makes any change to the prompt ripple through every later token, so nearly every answer
# changes; look instead at how much of each answer survived (`answer_overlap`, ROUGE-L) and at
# whose triggers changed.

# %%
queries = responses["prompt"].head(ablation_prompts).tolist()
engine = engine_for(config, loaded)
table = self_align.ablate(queries, engine, principles, principles.without(ablate_principle), config)
print(f"{table['answer_changed'].sum()} of {len(table)} answers changed without principle {ablate_principle}; "
      f"median ROUGE-L overlap {table['answer_overlap'].median():.2f}")
table[["prompt", "answer_a", "answer_b", "triggers_a", "triggers_b", "answer_overlap"]]
