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
# # 4. Verbose cloning
#
# **What this stage does.** The engraved model of stage 3 answers stage 3's prompts again, this
# time with an extra instruction in its system overview asking for thorough, well-organised
# answers (`principles/verbose_prompt.yaml`). A second LoRA adapter, trained from the *base*
# model again, learns those answers with the instruction *removed* from the context.
#
# **Why.** The paper found the engraved model's answers too short and terse, a trait inherited
# from the brief exemplars. Asking for detail fixes it only while the request is in the prompt;
# training on the detailed answers without the request (context distillation) makes it the
# model's default. This adapter is the final model of the method.
#
# **What to look at.** How much longer the teacher's answers are than stage 2's, how many ran into
# the token limit (cut after their last full sentence, and trained on *without* the end marker, so
# the student does not learn to stop where the teacher was cut), the student's loss, and whether the
# student, with no instruction, finds the teacher's held-out answers likelier than the base
# model does.

# %% tags=["parameters"]
run: str = "demo"  # reads runs/<run>/engrave/, writes runs/<run>/verbose/
runs_dir: str = "runs"  # where run directories live
model: str = "smollm2-135m-instruct"  # the base model stages 2 and 3 used
max_new_tokens: int = 128  # per teacher answer (the paper: 512)
replicas: int = 1  # teacher replicas answering at once on Ray (pip install 'selfalign[ray]'); 1: this process
limit: int = 0  # the teacher answers the first N of stage 3's prompts (0: all)
epochs: int = 2  # student training passes (the paper: 1)
learning_rate: float = 4e-4  # the paper's
micro_batch_size: int = 4  # examples per forward pass
cutoff: int = 768  # longest student example in tokens (the paper's)
sample_prompts: int = 2  # held-out prompts answered by every model at the end
sample_max_new_tokens: int = 64  # per answer in that comparison
seed: int = 0  # sampling, LoRA initialisation and batch order
settings: dict = {}  # any other setting of the stage (the profile's; `selfalign stage verbose --help` lists them)

# %%
import pandas as pd

from selfalign.chat_format import ChatFormat, read_instruction
from selfalign.models import load_model
from selfalign.stages import engrave, self_align, verbose
from selfalign.training import plot_loss

chat = ChatFormat.load()
print(chat.prompt("How do I boil an egg?", instruction=read_instruction()))

# %% [markdown]
# The teacher's prompt, above: the instruction sits in the system overview. The student is
# trained on the same answers after the prompt *without* it.

# %%
loaded = load_model(model)
config = verbose.VerboseConfig(run=run, runs_dir=runs_dir, model=model, max_new_tokens=max_new_tokens,
                               replicas=replicas, limit=limit, epochs=epochs, learning_rate=learning_rate,
                               micro_batch_size=micro_batch_size, cutoff=cutoff, seed=seed, **settings)
manifest = verbose.run(config, loaded=loaded)
pd.Series(manifest["counts"], name="value").to_frame()

# %% [markdown]
# ## Longer answers?
#
# Words per answer: stage 2 (principles in context) against the verbose teacher.

# %%
import matplotlib.pyplot as plt

frames = verbose.tables(run, runs_dir)
answers = frames["answers"]
stage_two = self_align.tables(run, runs_dir)["responses"]
_, ax = plt.subplots(figsize=(6, 3))
ax.hist([stage_two["answer"].str.split().str.len(), answers["answer"].str.split().str.len()], bins=20,
        label=["stage 2", "verbose teacher"])
ax.set_xlabel("answer length (words)")
ax.legend();

# %%
answers[["prompt", "answer", "cut_at_length"]].head(5)

# %% [markdown]
# ## Open the box: the teacher's prompt and the student's
#
# For one of this run's prompts: what the verbose teacher (the engraved model) read, and what the
# student is trained on after. They differ only by the instruction in the system overview. An
# answer that ran into the token limit is cut back to its last full sentence (`cut_to_sentence`)
# and trains without the end-of-answer marker, so it does not teach the student to stop mid-way.

# %%
one = answers.iloc[0]
teacher_prompt = chat.prompt(one["prompt"], instruction=read_instruction(config.instruction))
student_prompt = chat.prompt(one["prompt"])
print(teacher_prompt, "\n" + "-" * 40)
print(student_prompt)
half = one["answer"][: len(one["answer"]) // 2]
pd.DataFrame({"text": [half, verbose.cut_to_sentence(half)]}, index=["an answer cut at half", "cut_to_sentence"])

# %% [markdown]
# ## The student

# %%
plot_loss(frames["loss"]);

# %%
counts = manifest["counts"]
if len(frames["comparison"]):
    print(f"held-out teacher answers: {len(frames['comparison'])}; mean log-prob per token, base "
          f"{counts['holdout_base_logprob']:.3f} -> student {counts['holdout_adapted_logprob']:.3f}")
engrave.plot_comparison(frames["comparison"], label="verbose student");

# %% [markdown]
# ## Base, engraved and final model on held-out prompts
#
# Greedy answers with no principles and no instruction in the context.

# %%
held = frames["data"][frames["data"]["split"] == "holdout"].head(sample_prompts)
engrave.side_by_side(loaded, held["prompt"].tolist(),
                     {"engraved": engrave.adapter_dir(run, runs_dir),
                      "verbose (final)": engrave.adapter_dir(run, runs_dir, "verbose")},
                     chat, max_new_tokens=sample_max_new_tokens)
