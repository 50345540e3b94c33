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
run: str = "demo"  # reads runs/<run>/engrave/ and verbose/, writes runs/<run>/evaluate/
runs_dir: str = "runs"  # where run directories live
model: str = "smollm2-135m-instruct"  # the base model of the run
benchmarks: list = ["truthfulqa", "hhh", "vicuna"]  # those whose data is missing are skipped
limit: int = 10  # items sampled from TruthfulQA and HHH (0: all 817 and 221)
vicuna_limit: int = 2  # Vicuna questions each model answers (0: as limit)
max_new_tokens: int = 64  # per Vicuna answer
replicas: int = 1  # model replicas writing Vicuna answers at once, on Ray (pip install 'selfalign[ray]')
judge: str = ""  # the Vicuna judge model; "": the base model
seed: int = 0  # which items are sampled
settings: dict = {}  # any other setting of the stage, e.g. data_dir (`selfalign stage evaluate --help` lists them)

# %%
import dataclasses

import pandas as pd

from selfalign.evals import plot_by_category
from selfalign.models import load_model
from selfalign.records import Run
from selfalign.stages import evaluate

config = evaluate.EvaluateConfig(run=run, runs_dir=runs_dir, model=model, benchmarks=benchmarks,
                                 limit=limit, vicuna_limit=vicuna_limit,
                                 max_new_tokens=max_new_tokens, replicas=replicas, judge=judge, seed=seed, **settings)
data_dir = evaluate.data_folder(config.data_dir)
missing = sorted(set(config.benchmarks) - set(evaluate.available(data_dir)))
if missing:
    print(f"No data in {data_dir} for {', '.join(missing)}, so they are skipped: `selfalign data prepare` fetches "
          "it (or takes an offline copy, `--from DIR`), then rerun this chapter.")
# The benchmarks evaluated; the stage refuses an empty list, so with none of them here it does not run.
benchmarks = [b for b in config.benchmarks if b not in missing]
print("models:", ", ".join(evaluate.models_of(Run(run, runs_dir))))

# %%
loaded = load_model(model)
evaluated = dataclasses.replace(config, benchmarks=tuple(benchmarks)) if benchmarks else None
manifest = evaluate.run(evaluated, loaded=loaded) if evaluated else None
table = evaluate.comparison(run, runs_dir)
table[~table["benchmark"].str.contains("/")].drop(columns=["note"], errors="ignore")

# %% [markdown]
# ## TruthfulQA by category
#
# MC1 of each model per category (the number in brackets is how many sampled questions it has).

# %%
per_category = evaluate.truthfulqa_by_category(run, runs_dir)
if len(per_category):
    plot_by_category(per_category, label="MC1")
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
evaluate.vicuna_answers(run, runs_dir, data_dir)

# %% [markdown]
# ## Open the box: one TruthfulQA question, scored
#
# No benchmark here generates text. For a multiple-choice question the scorer reads the primer and
# the question once, then gives each candidate answer its summed log-probability; MC1 is 1 when the
# best answer outscores every false one. Below, the first question of the file, scored by the base
# model through `score_choices` directly, and then through `truthfulqa_mc`, which the stage calls:
# the two must agree.

# %%
from pathlib import Path

from IPython.display import display

from selfalign import evals
from selfalign.scoring import score_choices

if "truthfulqa" in benchmarks:
    question = evals.load_truthfulqa(Path(data_dir) / "truthfulqa.csv")[0]
    templates = evals.load_templates()
    context = templates["truthfulqa_primer"] + templates["truthfulqa_question"].format(question=question.question)
    candidates = [question.best, *(question.mc1_incorrect or question.incorrect)]
    scores = score_choices(loaded.model, loaded.tokenizer, [(context, " " + c) for c in candidates], progress=False)
    by_hand = evals.mc1(scores[0].logprob, [s.logprob for s in scores[1:]])
    by_stage = evals.truthfulqa_mc(loaded, [question], with_mc2=False, progress=False).items.iloc[0]["mc1"]
    assert by_hand == by_stage
    print(f"Q: {question.question}\nMC1 = {by_hand:.0f} (the stage's function agrees)")
    display(pd.DataFrame({"answer": candidates, "true": [True] + [False] * (len(candidates) - 1),
                          "log P(answer | question)": [s.logprob for s in scores],
                          "tokens": [s.tokens for s in scores]}))

# %% [markdown]
# ## Which principles fired in stage 2
#
# The same statistics as chapter 2, from the same functions: the share of stage-2 answers whose
# internal thoughts cite each principle.

# %%
from selfalign import triggers
from selfalign.principles import load_principle_set
from selfalign.stages import self_align

responses = self_align.tables(run, runs_dir)["responses"]
overall, per_type = triggers.trigger_stats(responses, load_principle_set())
overall
