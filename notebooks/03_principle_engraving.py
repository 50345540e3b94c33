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
# # 3. Principle engraving
#
# **What this stage does.** Stage 2's answers were written with sixteen principles and five
# exemplars in the model's context. Here the base model is fine-tuned (LoRA, with `peft`) on
# those answers with *none* of that in its context: just a short system overview
# (`principles/engrave_template.yaml`) and the user's prompt. The loss is taken on the answer
# tokens only.
#
# **Why.** The principles cost thousands of tokens of context on every query, and the model only
# follows them while they are there. Engraving moves them into the weights: afterwards the model
# answers in the principled way with nothing but the question in front of it.
#
# **What to look at.** The training format (what the model sees, and which tokens it learns), the
# loss curve, and the held-out test: a share of stage 2's answers is kept out of training, and we
# ask whether the engraved model, *without* principles in its context, finds those unseen
# principle-guided answers likelier than the base model does. That is the effect engraving is
# for. With a 135M model and a few dozen examples, expect a small, real shift, not a new model.

# %% tags=["parameters"]
run: str = "demo"  # reads runs/<run>/self_align/, writes runs/<run>/engrave/
runs_dir: str = "runs"  # where run directories live
model: str = "smollm2-135m-instruct"  # the base model stage 2 ran
responses: str = ""  # a response file; "": this run's stage-2 responses
epochs: int = 3  # passes over the training answers (the paper: 1, over far more data)
learning_rate: float = 4e-4  # the paper's
micro_batch_size: int = 4  # examples per forward pass
cutoff: int = 512  # longest training example in tokens (the paper's)
holdout: float = 0.2  # share of answers kept out of training to measure the effect
sample_prompts: int = 2  # held-out prompts answered by both models at the end
sample_max_new_tokens: int = 64  # per answer in that comparison
seed: int = 0  # LoRA initialisation, batch order and held-out split
settings: dict = {}  # any other setting of the stage (the profile's; `selfalign stage engrave --help` lists them)

# %%
import pandas as pd

from selfalign.chat_format import ChatFormat
from selfalign.models import load_model
from selfalign.stages import engrave
from selfalign.training import plot_loss

chat = ChatFormat.load()
example_prompt = chat.prompt("How do I boil an egg?")
print(example_prompt + "⟦" + chat.target("Put the egg in boiling water for nine minutes.") + "⟧")

# %% [markdown]
# Above is one training example. Everything before ⟦ is context: the model reads it but is not
# trained to produce it. The part inside ⟦ ⟧ is what it learns to write, including the closing
# `### User`, which teaches it where an answer ends (generation stops there). Besides stage 2's
# answers, the training data holds a few conversations in which the assistant says who it is
# (`principles/identity.yaml`; the counts below show how many as `identity`).

# %%
loaded = load_model(model)
config = engrave.EngraveConfig(run=run, runs_dir=runs_dir, model=model, responses=responses,
                               epochs=epochs, learning_rate=learning_rate, micro_batch_size=micro_batch_size,
                               cutoff=cutoff, holdout=holdout, seed=seed, **settings)
manifest = engrave.run(config, loaded=loaded)
pd.Series(manifest["counts"], name="value").to_frame()

# %%
frames = engrave.tables(run, runs_dir)
frames["data"]["split"].value_counts().to_frame()

# %% [markdown]
# ## Open the box: what the loss sees
#
# `build_examples` turns a record into token ids and a loss mask. Here are two of this run's
# training examples, a stage-2 answer and an identity conversation, token by token: grey tokens
# are context (read, not trained), green ones carry the loss. The context is only the conversation
# format and the question; the principles and exemplars stage 2 wrote behind are nowhere in it.
# That absence is what "engraving" means, and the stage checks it: an example whose context holds
# a principle's text, or whose every token is masked, stops the stage with the example's id.

# %%
from IPython.display import HTML, display

from selfalign.training import build_examples, loss_mask_html

trained = frames["data"][frames["data"]["split"] == "train"]
for _, row in trained.groupby("source", sort=False).head(1).iterrows():
    examples, _ = build_examples([row.to_dict()], loaded, chat, config.cutoff, config.overlong)
    print(f"{row['id']} ({row['source']}): {len(examples[0].input_ids)} tokens, {examples[0].answer_tokens} trained")
    display(HTML(loss_mask_html(examples[0], loaded.tokenizer)))

# %% [markdown]
# ## Loss
#
# One point per optimizer step (a few examples each, so it is noisy); the counts above compare the
# mean of the first and the last epoch.

# %%
plot_loss(frames["loss"]);

# %% [markdown]
# ## Did the principles move into the weights?
#
# For every held-out answer: the mean log-probability per token that the base model (x) and the
# engraved model (y) give it, both with only the system overview and the prompt in context.

# %%
comparison = frames["comparison"]
counts = manifest["counts"]
if len(comparison):
    print(f"held-out answers: {len(comparison)}; mean log-prob per token, base {counts['holdout_base_logprob']:.3f}"
          f" -> engraved {counts['holdout_adapted_logprob']:.3f}; {counts['holdout_improved']} of {len(comparison)}"
          " likelier under the engraved model")
engrave.plot_comparison(comparison);

# %% [markdown]
# ## The same held-out prompts, answered
#
# Greedy answers from the base model and the engraved one, both without principles, beside the
# principle-guided answer stage 2 wrote.

# %%
held = frames["data"][frames["data"]["split"] == "holdout"].head(sample_prompts)
answers = engrave.side_by_side(loaded, held["prompt"].tolist(), {"engraved": engrave.adapter_dir(run, runs_dir)},
                               chat, max_new_tokens=sample_max_new_tokens)
answers["stage 2 (with principles)"] = held["answer"].tolist()
answers
