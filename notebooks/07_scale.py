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
# # 7. Scale: LLaMA-65B, memory and GPU-hours
#
# **What this chapter does.** The earlier chapters ran SELF-ALIGN on a 135M-parameter model on a
# CPU. The paper ran it on LLaMA-65B over about 360,000 prompts. This chapter computes, from the
# model's shape alone, what that takes: how much GPU memory each training configuration needs, and
# how many GPU-hours each stage costs. Nothing is measured or loaded here; every number comes from
# `selfalign.cost` and the assumptions it prints.
#
# **Why generation dominates.** Stages 1, 2 and 4's teacher *generate*: every new token reads all
# 130 GB of weights (shared by a batch) plus the batch's key/value cache. That is a memory-bandwidth
# cost, so it is modelled as a fraction of the card's memory floor. Stages 3 and 4's student
# *train* a LoRA adapter: a compute cost, modelled as FLOPs at a measured utilisation.
#
# **What to look at.** That the `full` profile is the paper's method, which configurations fit an
# 80 GB card, and which stage the hours go to.
# Then change the parameters below to your own model, prompt count and measured throughput
# (`benchmarks/generation_gpu.py` prints tokens/s and the percentage of the floor on your card).

# %% tags=["parameters"]
run: str = "demo"  # unused here (no run files are read); kept so every chapter takes the same parameters
model_shape: str = "llama-65b"  # "llama-7b", "llama-65b", or a model directory / config.json
prompt_count: int = 367_718  # prompts kept after stage 1 (the paper: 267,597 Self-Instruct + 99,121 red-team)
gpu: str = "H100"  # H100, H200 or A100: its memory, bandwidth and peak FLOPs
floor_fraction: float = 0.6  # decode speed as a share of the memory floor (the hf-static backend measured 0.70 on an H200)
mfu: float = 0.24  # training FLOPs utilisation (measured: 0.24 for LoRA on a 7B shape, H200)
decode_tokens_per_s: float = 0.0  # your measured decode tokens/s per GPU; 0: use floor_fraction instead
generation_batch: int = 64  # sequences decoded together
generation_replicas: int = 4  # model replicas generating at once (the stages' `replicas` setting, on Ray)
gpus_per_replica: int = 8  # GPUs each replica spans (vLLM's tensor_parallel_size; 65B in bf16 needs several)
profile: str = "full"  # the profile whose settings are compared with the paper's
processes: int = 8  # the processes `accelerate launch` trains stages 3-4 with (sets the accumulation; 1 GPU each)

# %%
import matplotlib.pyplot as plt
import pandas as pd

from selfalign import cost

shape = cost.model_shape(model_shape)
card = {"H100": cost.H100, "H200": cost.H200, "A100": cost.A100}[gpu]
pd.Series({
    "parameters (billions)": round(cost.param_count(shape) / 1e9, 2),
    "LoRA parameters, rank 16 on q/k/v/o (millions)": round(cost.lora_param_count(shape) / 1e6, 1),
    "bf16 weights (GB)": round(cost.weight_bytes(shape) / 1e9, 1),
    "K/V cache per token (MB)": round(cost.kv_bytes_per_token(shape) / 1e6, 2),
    "card": f"{card.name}: {card.memory_gb:g} GB, {card.read_bytes_per_s / 1e12:g} TB/s, "
            f"{card.bf16_flops / 1e12:g} TFLOPS bf16",
}, name=model_shape).to_frame()

# %% [markdown]
# ## What would run: the profile beside the paper
#
# `selfalign run --profile full --dry-run` resolves every stage's settings without loading a model.
# Here they stand beside the values of the paper's released scripts (IBM/Dromedary, branch
# dromedary_v1), with our defaults (the CPU book's) and why those differ. Under `full` nothing
# should differ; the rows after the table are what the paper did that no setting reproduces.

# %%
from IPython.display import display

from selfalign import paper
from selfalign.profiles import load_profile, resolve

shown = resolve(load_profile(profile)).as_dict(processes)
print(f"profile {profile!r}, {processes} training processes: stage 3 accumulates "
      f"{shown['engrave']['accumulation_steps']} micro-batches of {shown['engrave']['micro_batch_size']}, "
      f"an effective batch of {shown['engrave']['effective_batch_size']}")
comparison = paper.chapter_table(shown)
print(f"{int(comparison['profile differs'].sum())} of {len(comparison)} paper settings differ under {profile!r}")
with pd.option_context("display.max_colwidth", None):  # the reasons are sentences: show them whole
    display(comparison.drop(columns=["source"]).set_index(["stage", "setting"]))

# %%
with pd.option_context("display.max_colwidth", None):
    display(pd.DataFrame(paper.NOT_SETTINGS, columns=["stage", "the paper", "ours", "why"]).set_index("stage"))

# %% [markdown]
# `full` generates on the `hf` backend in one process. Its companion `profiles/full-cluster.yaml`
# is the same run laid out for 65B: each generating stage on vLLM, a replica over a node's 8 GPUs
# (tensor parallel), one replica per node on Ray. `selfalign run --profile full-cluster --dry-run
# --processes 32 -p model DIR` prints its settings, each stage's longest prompt against the model's
# context, and each stage's GPU-hours on that layout (`selfalign.cost`, as in the sections below).

# %%
from selfalign.config import GenerationSettings

cluster = resolve(load_profile("full-cluster")).stages
pd.DataFrame([{"stage": name, "backend": c.backend, "tensor_parallel_size": c.tensor_parallel_size,
               "replicas": c.replicas} for name, c in cluster.items()
              if isinstance(c, GenerationSettings)]).set_index("stage")

# %% [markdown]
# ## Memory: what fits on which cards
#
# LoRA training keeps the base model frozen, so its weights can be sharded (FSDP over 8 GPUs in
# bf16) or quantized (8-bit, or QLoRA's 4-bit NF4 on a single card). The adapter, its gradients and
# AdamW's moments are small; activations depend on the micro-batch and the cutoff (512 for
# engraving). The last row is generation: bf16 weights split over 8 GPUs plus the cache of a batch.

# %%
plan = cost.TrainPlan()
memory = cost.plan_table(shape, plan, card_gb=card.memory_gb)
print("assumptions:", plan)
memory.round(1)

# %%
parts = ["weights_gb", "lora_state_gb", "activations_gb", "kv_cache_gb", "overhead_gb"]
ax = memory.set_index("configuration")[parts].plot.barh(stacked=True, figsize=(9, 3.2))
ax.axvline(card.memory_gb, color="black", linestyle="--", label=f"{card.name} ({card.memory_gb:g} GB)")
ax.set_xlabel("GB per GPU")
ax.legend(loc="lower right", fontsize=8)
plt.tight_layout()

# %% [markdown]
# ## GPU-hours per stage
#
# Generation stages: prompt tokens at the prefill rate plus new tokens at the decode rate, per GPU.
# A shared prefix (the principles and exemplars of stage 2) is computed once and cached, as the
# engine does. Training stages: LoRA costs 4 forward-equivalents a token (6 with gradient
# checkpointing, which recomputes the forward), at `mfu` of the card's peak.
#
# Wall time: generation runs on `generation_replicas` replicas of `gpus_per_replica` GPUs each
# (the stages' `replicas` setting; docs/generation.md, "Generation on several replicas"), training on
# `processes` GPUs. `wall_hours` is a stage's GPU-hours over its GPUs: more replicas shorten the
# wall time, and leave the GPU-hours as they are.

# %%
assume = cost.CostAssumptions(gpu=card, mfu=mfu)
throughput = None
if decode_tokens_per_s:
    roofline = cost.roofline_throughput(shape, card, generation_batch, mfu=mfu)
    throughput = cost.Throughput(prefill=roofline.prefill, decode=decode_tokens_per_s,
                                 source=f"measured decode {decode_tokens_per_s:g} tok/s per GPU; prefill: roofline")
layout = dict(replicas=generation_replicas, gpus_per_replica=gpus_per_replica, train_gpus=processes)
table = cost.cost_table(cost.paper_stages(prompt_count), shape, throughput, assume, batch=generation_batch,
                        floor_fraction=floor_fraction, **layout)
pd.set_option("display.max_colwidth", 200)
table[["stage", "kind", "prefill_tokens", "decode_tokens", "train_tokens", "gpu_hours", "gpus", "wall_hours",
       "assumptions"]].round(1)

# %%
hours = table[table["stage"] != "total"].set_index("stage")["gpu_hours"]
ax = hours.plot.barh(figsize=(7, 2.8), color=["tab:blue" if k == "generation" else "tab:orange"
                                               for k in table[table["stage"] != "total"]["kind"]])
ax.set_xlabel(f"GPU-hours on {card.name} (blue: generation, orange: training)")
plt.tight_layout()
print(f"total: {table['gpu_hours'].iloc[-1]:,.0f} GPU-hours; {table['wall_hours'].iloc[-1] / 24:,.1f} days of wall "
      f"time with {generation_replicas} replicas of {gpus_per_replica} GPUs generating and {processes} GPUs training")

# %% [markdown]
# ## How replicas change the clock
#
# The same stages with more replicas: the generation stages' wall time divides by the replica
# count, the GPU-hours do not (nor does training's wall time, on its own GPUs).

# %%
by_replicas = []
for count in (1, 2, 4, 8, 16):
    costed = cost.cost_table(cost.paper_stages(prompt_count), shape, throughput, assume, batch=generation_batch,
                             floor_fraction=floor_fraction, **{**layout, "replicas": count})
    by_replicas.append({"replicas": count, "GPUs generating": count * gpus_per_replica,
                        "GPU-hours": round(costed["gpu_hours"].iloc[-1]),
                        "wall days": round(costed["wall_hours"].iloc[-1] / 24, 1)})
pd.DataFrame(by_replicas)

# %% [markdown]
# ## How the backend changes the bill
#
# The decode rate is the lever. Plain `generate` (backend `hf`) reached about 10% of the memory
# floor at batch 64 on an H200; the engine's `hf-static` backend, a static cache with the decode
# step compiled into a CUDA graph, reached 70% (benchmarks/RESULTS.md). The same stages at each:

# %%
rows = []
for label, fraction in [("hf (plain generate), ~10%", 0.10), ("hf-static (compiled), ~70%", 0.70)]:
    costed = cost.cost_table(cost.paper_stages(prompt_count), shape, None, assume, batch=generation_batch,
                             floor_fraction=fraction)
    rows.append({"backend": label, "GPU-hours": round(costed["gpu_hours"].iloc[-1])})
pd.DataFrame(rows)

# %% [markdown]
# To run the stages at this scale: `selfalign stage prompts|self-align --backend hf-static` (or
# `--backend vllm --tensor-parallel-size 8` where vLLM is installed, with `--replicas N` to spread
# the prompts over N such replicas on a Ray cluster: `configs/slurm/`), and the accelerate configs
# in `configs/accelerate/` for stages 3 and 4 (docs/stages.md, "Training at scale").
