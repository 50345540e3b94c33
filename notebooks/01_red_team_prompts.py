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
# # 1. Topic-guided red-teaming self-instruct
#
# **What this stage does.** Starting from a few dozen human-written seed prompts
# (`principles/seed_prompts.jsonl`), the base model writes the prompts that the rest of SELF-ALIGN
# trains on. Two sources are mixed:
#
# - *Self-Instruct*: the model continues a numbered list of sampled seed prompts, and each new
#   list item becomes a candidate prompt.
# - *Topic-guided red-teaming*: for each adversarial instruction type in
#   `principles/red_team_types.yaml` (questions that need real-time information, personal
#   opinions, legal expertise, ...), the model first brainstorms topics, then writes a question
#   for each (type, topic) pair after a couple of seed questions of that type.
#
# **Why.** The red-team types are the situations where an unaligned model goes wrong: it invents
# facts, claims opinions or knowledge it cannot have. Stage 2 needs many such prompts for its
# principles to matter, and writing them by hand does not scale; the paper generated about 360,000.
#
# **What to look at.** How many prompts each type produced, why candidates were dropped (too
# short, a task needing images or files, or a near-duplicate by ROUGE-L), and whether the
# questions really are of their type. With a 135M model expect rough text; the pipeline is the
# same one that LLaMA-65B runs.

# %% tags=["parameters"]
run: str = "demo"  # results go to runs/<run>/prompts/
runs_dir: str = "runs"  # where run directories live
model: str = "smollm2-135m-instruct"  # registered name, model directory, or hub id
backend: str = "hf"  # "hf"; "hf-static" on a GPU (static cache + torch.compile); "vllm" (pip install 'selfalign[vllm]')
replicas: int = 1  # model replicas generating at once on Ray (pip install 'selfalign[ray]'); 1: this process
n_self_instruct: int = 8  # Self-Instruct prompts to keep
types_limit: int = 0  # use only the first N red-team types (0: all 20)
topics_per_type: int = 1  # topics brainstormed per type
n_per_topic: int = 1  # questions written per (type, topic)
seed: int = 0  # sampling seed
settings: dict = {}  # any other setting of the stage (the profile's; `selfalign stage prompts --help` lists them)

# %%
from selfalign import red_team
from selfalign.stages import prompts as prompts_stage

config = prompts_stage.PromptsConfig(run=run, runs_dir=runs_dir, model=model, backend=backend, replicas=replicas,
                                     n_self_instruct=n_self_instruct,
                                     types_limit=types_limit, topics_per_type=topics_per_type,
                                     n_per_topic=n_per_topic, seed=seed, **settings)
manifest = prompts_stage.run(config)
{k: v for k, v in manifest["counts"].items() if k != "drops"}

# %% [markdown]
# ## What was kept
#
# Each bar is one red-team type; the grey bar is Self-Instruct. The types are balanced by
# construction: every type gets the same number of topics and questions per topic, so a short
# bar means its questions were dropped.

# %%
frames = prompts_stage.tables(run, runs_dir)
prompts = frames["prompts"]
red_team.plot_prompts_per_type(prompts);

# %%
prompts[["source", "type", "topic", "prompt"]].sample(min(12, len(prompts)), random_state=seed)

# %% [markdown]
# ## What was dropped, and why
#
# Every candidate that did not make it is in `drops.jsonl` with its reason. The near-duplicate
# filter compares each candidate of the sources in `rouge_sources` with the seeds and the kept
# prompts of those sources by ROUGE-L, exactly as the reference `rouge_score` package would, but
# hundreds of times faster (see `benchmarks/RESULTS.md`). By default both sources are filtered;
# the paper (the `full` profile) filtered Self-Instruct only and kept red-team questions whole.

# %%
counts = manifest["counts"]
print(f"ROUGE-L >= {counts['rouge_threshold']} against: {', '.join(counts['rouge_compared_against']) or 'nothing'}")
drops = frames["drops"]
drops["reason"].str.split(" \\(").str[0].value_counts().rename("candidates").to_frame()

# %% [markdown]
# ## The topics the model invented
#
# Topics are deduplicated case-insensitively within each type, and each type keeps at most
# `topics_per_type` of them.

# %%
frames["topics"].groupby("type")["topic"].apply(", ".join).to_frame()

# %% [markdown]
# ## Open the box: from a continuation to kept prompts
#
# The stage never trusts what the model writes, only its layout. It shows the model a numbered
# list and asks for the next items; `parse_numbered_list` splits the continuation at the numbered
# lines (whatever numbers the model wrote) and, when generation stopped at the token limit, throws
# away the last item, which was cut off. `filter_reason` refuses items that are too short, too
# long, or not a task for text. The ROUGE-L filter then drops each item too close to one already
# kept (here: to an earlier item of the same list). Below, a continuation written by hand goes
# through the same three functions the stage calls.

# %%
import pandas as pd

from selfalign.dedup import rouge_l_filter, rouge_l_fmeasure

continuation = ("Write a short poem about the sea at night.\n"
                "5. List three uses of a paperclip in an office.\n"
                "6. Write a short poem about the sea at night time.\n"
                "7. Draw a picture of a cat on a sofa.\n"
                "8. Hi there\n"
                "9. Explain how a refrigerator keeps food")
items = red_team.parse_numbered_list(continuation, cut_off=True)
reasons = [red_team.filter_reason(item, config.min_words, config.max_words) for item in items]
usable = [item for item, reason in zip(items, reasons) if reason is None]
survivors = {usable[i] for i in rouge_l_filter(usable, threshold=config.rouge_threshold)}
pd.DataFrame({
    "item": items,
    "filter": [reason or "passes" for reason in reasons],
    "closest earlier item (ROUGE-L)": [max((rouge_l_fmeasure(item, earlier) for earlier in items[:i]), default=0.0)
                                       for i, item in enumerate(items)],
    "kept": [item in survivors for item in items],
})
