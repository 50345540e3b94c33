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
# # 5. Evaluation
#
# **What this stage does.** The base model, the engraved model (stage 3) and the verbose-cloned
# final model (stage 4) take the same tests:
#
# - **TruthfulQA multiple choice.** MC1: is the best true answer the likeliest among it and the false
#   ones? MC2: the share of probability on the true answers. Both by answer log-likelihood after
#   the benchmark's standard six-question primer. Beside them, the paper's own variant (each answer
#   judged alone in a true/false exam), labelled as such: it gives a different number for the same
#   model, which is the point of showing it.
# - **BIG-bench HHH.** Two answers to the same dialogue, one more helpful, honest or harmless; is it
#   the one the model prefers? By total answer log-likelihood, by per-token log-likelihood, and by
#   the paper's A/B exam asked in both orders (which cancels a preference for "A").
# - **Vicuna questions.** Each model answers; a judge model compares each trained model's answer
#   with the base model's, in both orders.
#
# **What to look at.** Differences between the columns, not the numbers alone. A 135M model scores
# near chance on TruthfulQA and HHH (random MC1 is about 0.2 to 0.25, HHH 0.5), and its
# judgements of Vicuna answers are a smoke test of the pipeline, not a finding: the paper's
# judge was GPT-4. With a sample of a few dozen items, differences of a few points are noise.

# %% tags=["parameters"]
run_name: str = "demo"  # reads runs/<run_name>/engrave/ and verbose/, writes runs/<run_name>/evaluate/
runs_dir: str = "runs"  # where run directories live
model: str = "smollm2-135m-instruct"  # the base model of the run
data_dir: str = "../shared/data"  # truthfulqa.csv, hhh_alignment/, vicuna_questions.jsonl
benchmarks: list = ["truthfulqa", "hhh", "vicuna"]  # those whose data is missing are skipped
limit: int = 10  # items sampled from TruthfulQA and HHH (0: all 817 and 221)
vicuna_limit: int = 2  # Vicuna questions each model answers (0: as limit)
max_new_tokens: int = 64  # per Vicuna answer
judge: str = ""  # the Vicuna judge model; "": the base model
seed: int = 0  # which items are sampled
settings: dict = {}  # any other setting of the stage (the profile's; `selfalign stage evaluate --help` lists them)

# %%
import pandas as pd

from selfalign.models import load_model
from selfalign.records import Run
from selfalign.stages import evaluation

missing = sorted(set(benchmarks) - set(evaluation.available(data_dir)))
benchmarks = [b for b in benchmarks if b not in missing]
if missing:
    print(f"no data in {data_dir} for {', '.join(missing)}: those are skipped. The README says where each file "
          "comes from; set data_dir to the folder that has them.")
print("models:", ", ".join(evaluation.models_of(Run(run_name, runs_dir))))

# %%
loaded = load_model(model)
config = evaluation.EvaluateConfig(run=run_name, runs_dir=runs_dir, model=model, benchmarks=benchmarks,
                                   limit=limit, vicuna_limit=vicuna_limit, data_dir=data_dir,
                                   max_new_tokens=max_new_tokens, judge=judge, seed=seed, **settings)
manifest = evaluation.run(config, loaded=loaded) if benchmarks else None
table = evaluation.comparison(run_name, runs_dir)
table[~table["benchmark"].str.contains("/")].drop(columns=["note"], errors="ignore")

# %% [markdown]
# ## TruthfulQA by category
#
# MC1 of each model per category (the number in brackets is how many sampled questions it has).

# %%
per_category = evaluation.truthfulqa_by_category(run_name, runs_dir)
if len(per_category):
    ax = per_category.drop(columns="n").iloc[::-1].plot.barh(figsize=(6, 0.25 * len(per_category) + 1.5))
    ax.set_yticklabels([f"{name} ({n})" for name, n in zip(per_category.index[::-1], per_category["n"][::-1])])
    ax.set_xlabel("MC1")
per_category

# %% [markdown]
# ## HHH by subset

# %%
hhh = table[table["benchmark"].str.startswith("hhh/")]
hhh.drop(columns=["note"], errors="ignore")

# %% [markdown]
# ## Vicuna answers, side by side
#
# The verdicts are for reading with the answers below, not on their own.

# %%
for note in sorted({n for n in table.get("note", []) if n}):
    print(note)
evaluation.vicuna_answers(run_name, runs_dir, data_dir)

# %% [markdown]
# ## Which principles fired in stage 2
#
# The same statistics as chapter 2, from the same functions: the share of stage-2 answers whose
# internal thoughts cite each principle.

# %%
from selfalign.principles import load_principle_set
from selfalign.stages import self_align

responses = self_align.tables(run_name, runs_dir)["responses"]
overall, per_type = self_align.trigger_stats(responses, load_principle_set())
overall
