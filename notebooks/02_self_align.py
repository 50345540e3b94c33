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
# **Short on purpose.** Each principle is one sentence and each exemplar a few, because the paper's
# model, LLaMA-65B, reads 2,048 tokens: the preamble, principles and exemplars take 1,535 of them in
# LLaMA's tokens, leaving room for a query of 200 and an answer of 256. Lengthen them and
# `selfalign run --profile full --dry-run -p model DIR` says whether they still fit.
#
# **Held to the format.** A 65B base model follows the exemplars' format by itself. A 135M one
# follows it loosely: left free, it cites "11 (Numerical Sensitivity)" for a principle 11 that is
# another one, or never writes the answer marker. So by default (`constrain_format`) the model
# decodes under the format's grammar: a few sentences of thoughts, "I should follow rules" and
# citations of *this* set's principles only, the answer marker, an answer of a few sentences.
# Inside those bounds every word is the model's own. The `full` profile samples freely, as the
# paper did, and every record says which way it was made (`constrained`).
#
# **A citation is not evidence.** The grammar only lets the model write *valid* citations; it
# does not make the model follow them. So for every kept answer the stage also asks the model
# how likely it finds each principle as the first citation after its own thoughts
# (`principle_scores`). Where the written triggers and the likelihoods disagree, trust the
# likelihoods.
#
# **What to look at.** Why responses were dropped, which principles fire for which red-team type
# (the two heatmaps: written citations, then likelihoods), and where they disagree. Chapter 6
# removes principles one at a time and measures what changes.

# %% tags=["parameters"]
run: str = "demo"  # reads runs/<run>/prompts/, writes runs/<run>/self_align/
runs_dir: str = "runs"  # where run directories live
model: str = "smollm2-135m-instruct"  # registered name, model directory, or hub id
backend: str = "hf"  # "hf", or "hf-static" on a GPU (static cache + torch.compile); vLLM: `selfalign stage self-align`
replicas: int = 1  # model replicas generating at once on Ray (pip install 'selfalign[ray]'); 1: this process
prompts: str = ""  # a prompt file; "": this run's stage-1 prompts
limit: int = 16  # answer the first N prompts (0: all)
max_new_tokens: int = 160  # per answer (the paper used 256)
assistant: str = "Watson"  # the name the model answers under
min_responses: int = 5  # fewer kept answers fail the stage (0: accept none); stage 3 needs 5 by default
seed: int = 0  # sampling seed
settings: dict = {}  # any other setting of the stage (the profile's; `selfalign stage self-align --help` lists them)

# %%
import pandas as pd

from selfalign import triggers
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
config = self_align.SelfAlignConfig(run=run, runs_dir=runs_dir, model=model, backend=backend, replicas=replicas,
                                    prompts=prompts, limit=limit, max_new_tokens=max_new_tokens, assistant=assistant,
                                    min_responses=min_responses, seed=seed, **settings)
manifest = self_align.run(config, loaded=loaded)
pd.Series(manifest["counts"]["drop_reasons"], name="dropped", dtype=int).to_frame()

# %% [markdown]
# ## Which principles fired
#
# Each cell is the share of a type's responses whose thoughts cite the principle.

# %%
frames = self_align.tables(run, runs_dir)
responses = frames["responses"]
overall, per_type = triggers.trigger_stats(responses, principles)
overall

# %%
triggers.plot_trigger_heatmap(per_type);

# %% [markdown]
# ## Which principles the model finds likely
#
# The same grid from `principle_scores`: for each type, the model's mean probability of citing
# each principle first, after the prompt and its own thoughts. The sixteen probabilities of a
# response add up to one, so the colour scale runs to the largest mean, not to one.

# %%
triggers.plot_score_heatmap(triggers.score_stats(responses, principles));

# %% [markdown]
# Where the written citations and the likelihoods disagree: for each kept answer, the principle
# the model finds most likely and whether its thoughts cite it.

# %%
disagree = triggers.disagreements(responses, principles)
print(f"{disagree['agrees'].sum()} of {len(disagree)} answers cite the principle the model finds most likely")
disagree

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
# ## Open the box: the format as a grammar
#
# With `constrain_format`, the stage hands this grammar (llguidance's dialect of Lark) to the
# decoder. Before every token, the tokens that could not continue a text the grammar allows are
# masked out; the model samples among the rest as usual. `accepts` asks the same question of a
# whole text: the hand-written continuation above is refused (it cites a principle 11 by another
# principle's name, and a principle 23 the set lacks), the same one with its citations fixed is
# allowed.

# %%
from selfalign.generation.grammar import accepts

grammar = self_align.sampling(config, principles).grammar
print(grammar)
fixed = by_hand.replace(f", 11 ({other.name}) and 23", f" and {other.number} ({other.name})").split("\n\nUser:")[0]
pd.DataFrame([{"continuation": text, "allowed": accepts(grammar, loaded.tokenizer, text)}
              for text in (by_hand.split("\n\nUser:")[0], fixed)], index=["as written", "citations fixed"])
