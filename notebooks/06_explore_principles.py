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
# # 6. Exploring the principles
#
# **What this chapter does.** It gives you three instruments for stage 2, interactive where a
# kernel runs the notebook:
#
# - a **principle editor**: the sixteen principles as editable text, each with an on/off toggle.
#   *regenerate* answers a few of the run's prompts twice with the same seeds, under the original
#   principles and under your edit, and shows the answers side by side; in the triggers column
#   a principle your edit made the model cite is green, one it no longer cites is struck out in
#   red. *save* writes your edit as a new principles file that `selfalign stage self-align
#   --principles FILE` reads (and, when you switched off a principle the exemplars cite, an
#   exemplars file without those citations, for `--exemplars`).
# - a **response inspector**: every stage-2 record of the run, kept or dropped, filtered by
#   red-team type, cited principle and drop reason, with the whole prompt the model saw and the
#   raw text it wrote.
# - a **trigger explorer**: the heatmap of chapter 2, and for any (type, principle) cell the
#   responses behind it.
#
# **Why.** The principles are the only human-written supervision in SELF-ALIGN, so it pays to
# see what a word changes. Both answers to a prompt are sampled with the same seed, so a
# difference comes from the edit, not from a new draw. Still, expect nearly every answer to
# change somewhat: an edit early in the prompt shifts every token sampled after it. The overlap
# column (ROUGE-L) shows how much of each answer survived.
#
# **What to look at.** Whether rewording a principle changes the answers it should and leaves
# the others mostly alone; whether the model still cites a principle you switched off (a model
# this small often does: it copies numbers from the exemplars); and, in the inspector, why the
# dropped answers were dropped. On a page of the built book the widgets are not live: run the
# notebook in JupyterLab to use them.

# %% tags=["parameters"]
run: str = "demo"  # reads runs/<run>/self_align/ (stage 2's records)
runs_dir: str = "runs"  # where run directories live
model: str = "smollm2-135m-instruct"  # the model that answers when you press regenerate
regenerate_prompts: int = 3  # prompts answered before and after an edit
max_new_tokens: int = 160  # per answer, as in stage 2
assistant: str = "Watson"  # the name stage 2 answered under
examples_per_cell: int = 5  # responses listed for a heatmap cell
seed: int = 0  # sampling seed of both answers

# %%
import pandas as pd

from selfalign import widgets
from selfalign.generation import Engine
from selfalign.models import load_model
from selfalign.principles import load_principle_set
from selfalign.stages.self_align import SelfAlignConfig

principles = load_principle_set()
records = widgets.load_records(run, runs_dir)
pd.DataFrame(records, columns=["status", "type"]).fillna({"type": widgets.SELF_INSTRUCT}).value_counts().to_frame()

# %% [markdown]
# ## The principle editor
#
# Change a principle's wording or untick it, then press *regenerate*. The prompts are the first
# few of the run, kept answers first.

# %%
engine = Engine.for_model(load_model(model), batch_size=8, progress=False)
config = SelfAlignConfig(max_new_tokens=max_new_tokens, assistant=assistant, seed=seed)
prompts = widgets.editor_prompts(records, regenerate_prompts)
widgets.PrincipleEditor(principles, prompts, engine, config)

# %% [markdown]
# ## The response inspector
#
# The filters combine. "(kept)" under drop reason shows the responses that became training data.
# The full prompt (folded; click it) is rendered with the current principle files; when those
# changed after the run, the inspector says so.

# %%
widgets.ResponseInspector(records, principles, assistant)

# %% [markdown]
# ## The trigger explorer
#
# Each cell of the heatmap is the share of a type's kept responses whose thoughts cite the
# principle. Pick a cell below it to read those responses.

# %%
widgets.TriggerExplorer(records, principles, examples_per_cell)
