# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 6. Exploring the principles
#
# **What this chapter does.** It asks what each of the sixteen principles does to stage 2's
# answers, first as one experiment that runs headless, then with instruments you drive yourself:
#
# - **leave-one-out**: a few of the run's prompts answered with all sixteen principles and then
#   without each one in turn (the same seeds), and per principle how many responses changed, how
#   much of each survived, how far the model's preference among the remaining citations moved,
#   and which red-team type moved most;
# - **static results** of the three widgets below, so that the built book shows them: one
#   principle edit with its answers before and after, the trigger heatmap with the responses of
#   its largest cell, and the heatmap of the citations the model finds likely;
# - the **widgets** themselves, live where a kernel runs the notebook (JupyterLab): a *principle
#   editor* (edit or switch off principles, *regenerate* a few answers under the original and
#   the edited set, *save* the edit as a principles file that `selfalign stage self-align
#   --principles FILE` reads), a *response inspector* (every stage-2 record, kept or dropped,
#   filtered by type, cited principle and drop reason, with the whole prompt and the raw output)
#   and a *trigger explorer* (the heatmap, and the responses behind any cell).
#
# **Why.** The principles are the only human-written supervision in SELF-ALIGN, so it pays to
# see what a word changes. The answers with and without a principle are sampled with the same
# seed, so a difference comes from the principles, not from a new draw. Still, expect answers to
# change somewhat under any edit: removing a principle shortens the prompt, and every token
# sampled after it can shift. The overlap (ROUGE-L against the full set's answer) says how much
# of each answer survived.
#
# **What to look at.** Whether leaving out a principle moves the answers it should (without 1
# *Ethical*, the harmful requests) and leaves the others mostly alone; whether the likelihood of
# the remaining citations moves (the model's *preference*, which a valid citation does not show:
# stage 2 decodes under a grammar that only lets it write well-formed citations of the principles
# it was shown); and, in the inspector, why the dropped answers were dropped.

# %% tags=["parameters"]
run: str = "demo"  # reads runs/<run>/self_align/ (stage 2's records); writes runs/<run>/leave_one_out/
runs_dir: str = "runs"  # where run directories live
model: str = "smollm2-135m-instruct"  # the model that answers the leave-one-out prompts and regenerates
loo_prompts: int = 2  # prompts every leave-one-out variant answers (17 variants)
loo_max_new_tokens: int = 96  # per leave-one-out response; the sampling is otherwise stage 2's
loo_principles: list = []  # the principles left out one at a time; []: every one
loo_scores: bool = True  # score each answer's likelihood of citing each principle
regenerate_prompts: int = 3  # prompts the editor answers before and after an edit
max_new_tokens: int = 160  # per editor answer, as in stage 2
assistant: str = "Watson"  # the name stage 2 answered under
examples_per_cell: int = 5  # responses listed for a heatmap cell
seed: int = 0  # sampling seed of every variant and of the editor's answers

# %%
import pandas as pd
from IPython.display import HTML

from selfalign import ablation, triggers, widgets
from selfalign.generation import Engine
from selfalign.models import load_model
from selfalign.principles import load_principle_set
from selfalign.stages import self_align
from selfalign.stages.self_align import SelfAlignConfig

principles = load_principle_set()
records = self_align.records(run, runs_dir)
pd.DataFrame(records, columns=["status", "type"]).fillna({"type": widgets.SELF_INSTRUCT}).value_counts().to_frame()

# %% [markdown]
# ## Leave one principle out
#
# `ablation.run` takes `loo_prompts` of stage 2's prompts (kept answers first, one red-team type
# before a second of any), and answers them under stage 2's own settings and principles, its
# format grammar included, with `loo_max_new_tokens` per answer: once with all sixteen
# principles, then once without each principle of `loo_principles` (its rule line and its
# citations in the exemplars are gone, and its grammar cannot cite it). Seventeen prompt
# prefixes of 1,400 tokens would be most of the cost, but they are not seventeen times new: a
# variant's prefix is the full set's up to the rule it leaves out, so it starts from the full
# set's key/value cache and runs only the rest (`generation.cache.PrefixStore`, like a serving
# engine's prefix cache). Variants are then decoded several at a time, each row attending to its
# own variant's prefix (`Engine.generate_groups`), and the likelihood scores start from the same
# caches. On this project's 2 CPU cores the seventeen variants take under three minutes
# (benchmarks/RESULTS.md). Each chunk of variants is appended to
# `runs/<run>/leave_one_out/answers.jsonl` when it finishes, and a rerun resumes.
# `selfalign leave-one-out --run RUN` runs the same from the command line
# (`-p loo_principles [1,7]` leaves out only those).
#
# A response here is the whole continuation: the thoughts, the rules they cite and as much of the
# answer as `loo_max_new_tokens` leaves room for (the book's 96 tokens reach a sentence or two
# into the answer, after the thoughts and citations, where a principle acts first). In the table, per
# principle left out: `changed`, responses not identical to the full set's (of `n`);
# `median_overlap`, their ROUGE-L F-measure with the full set's response; `triggers_changed`;
# `score_shift`, the mean total-variation distance between the full set's citation likelihoods
# (renormalised over the fifteen remaining principles) and the variant's own, 0 when the model
# still prefers the other principles as it did; `most_moved_type`, the red-team type of least
# overlap; `effect`, 1 - the mean overlap, by which the rows are ranked.

# %%
loaded = load_model(model)
loo = ablation.LeaveOneOutConfig(run=run, runs_dir=runs_dir, model=model, seed=seed, loo_prompts=loo_prompts,
                                 loo_max_new_tokens=loo_max_new_tokens, loo_principles=tuple(loo_principles),
                                 loo_scores=loo_scores)
answers, summary = ablation.run(loo, loaded=loaded)
summary

# %%
ablation.plot_leave_one_out(summary);

# %% [markdown]
# **What this shows on a 135M model.** Read the chart as what a small model does with a prompt
# of 1,400 tokens, not as what each principle means. Removing any principle changes the prompt,
# and sampling at stage 2's temperature lets that change ripple through everything after it, so
# a removal "moves" responses that have nothing to do with it, and with two prompts one changed
# response decides a row. The cell below counts the removals that changed a response at all: in
# the runs this chapter was written against, every one did, often on a self-instruct prompt
# that no principle is about, so the left-hand ranking is mostly noise. The likelihood
# shift on the right is the more telling column, because it does not depend on a sampled token:
# it is near 0 where the model only handed the missing principle's share to the others in
# proportion, and large where its preference among the *remaining* principles moved. Neither
# column is evidence that the model *follows* a principle; a 65B model, and more prompts
# (`selfalign run --profile small`, or `-p loo_prompts 16`), are what would turn them into one.
# The `full` profile answers 64 prompts at the paper's answer length.

# %%
moved = int((summary["changed"] > 0).sum())
shifts = summary["score_shift"].dropna()
print(f"{moved} of {len(summary)} removals changed at least one of the {answers['key'].nunique()} responses; "
      f"{int((summary['triggers_changed'] > 0).sum())} changed which principles a response cites"
      + (f"; the likelihood shift ran from {shifts.min():.2f} to {shifts.max():.2f}" if len(shifts) else ""))

# %% [markdown]
# ## The widgets' results, for the page
#
# Papermill saves no widget state, so the widgets below are blank on a page of the built book.
# The next cells show what they show, from the answers above (nothing is generated twice).
#
# ### One principle edit
#
# The principle whose removal moved the responses most, switched off: the full set's responses
# (*before*) beside those without it (*after*), and the triggers after the edit, with those it
# added in green and those it removed struck out in red. This is the principle editor's
# comparison for that edit.

# %%
edit = int(summary["left_out"].iloc[0])
edited = ablation.as_ablation(answers, edit)
HTML(widgets.comparison_html(edited, principles, widgets.describe_edits(principles, principles.without(edit))))

# %% [markdown]
# ### The trigger explorer
#
# Each cell of the heatmap is the share of a type's kept responses whose thoughts cite the
# principle; below it, the responses behind its largest cell.

# %%
kept = pd.DataFrame([r for r in records if r["status"] == "kept"],
                    columns=["id", "type", "triggers", "thoughts", "answer", "principle_scores"])
overall, per_type = triggers.trigger_stats(kept, principles)
triggers.plot_trigger_heatmap(per_type);

# %%
cells = widgets.heatmap_cells(per_type)
if cells:
    label, (kind, number) = cells[0]
    cell = HTML(f"<p>largest cell: {label}</p>"
                + widgets.examples_html(widgets.examples_for(records, kind, number, examples_per_cell)))
else:
    cell = HTML("<p><i>No kept response cites a principle, so the heatmap has no cell to open.</i></p>")
cell

# %% [markdown]
# ### Which principles the model finds likely
#
# For every kept response stage 2 scored the model's probability of citing each principle first,
# after the prompt and the response's own thoughts. The heatmap is its mean by red-team type:
# where it and the trigger heatmap disagree, the model wrote one citation and preferred another.

# %%
likely = triggers.score_stats(kept, principles)
triggers.plot_score_heatmap(likely);

# %% [markdown]
# ## The principle editor
#
# Change a principle's wording or untick it, then press *regenerate*. The prompts are the first
# few of the run, kept answers first.

# %%
engine = Engine.for_model(loaded, batch_size=8, progress=False)
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
# Pick a cell below the heatmap to read the responses behind it.

# %%
widgets.TriggerExplorer(records, principles, examples_per_cell)
