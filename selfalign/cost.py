"""What SELF-ALIGN costs at scale: GPU-hours per stage, and GPU memory per training configuration.

Two back-of-envelope models whose every assumption is a field or an argument:

- cost: a generation stage is prompt tokens over prefill tokens/s plus new tokens over decode
  tokens/s (per GPU; measured with `benchmarks/generation_gpu.py` or estimated by
  `roofline_throughput`); a training stage is FLOPs over peak FLOPs x MFU. `paper_stages` is the
  paper's setting (LLaMA-65B, ~367k prompts and answers, LoRA engraving and verbose cloning);
- memory: weights in bf16 / int8 / nf4, KV cache, LoRA parameters and their optimizer state,
  activations, per GPU for FSDP in bf16, 8-bit on one GPU and 4-bit QLoRA on one GPU, and
  whether that fits a card.

The closed-form counts cover LLaMA-style decoders (gated MLP, no biases); `meta_param_count` counts
any transformers config exactly, on the meta device. Nothing here measures or allocates anything;
attention FLOPs, communication and the tokenizer are left out (at 2k context attention adds ~2% to
65B's FLOPs). `plan_table` and `cost_table` return the DataFrames the book shows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

LLAMA_7B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                intermediate_size=11008, vocab_size=32000)
LLAMA_65B = dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=64,
                 intermediate_size=22016, vocab_size=32000)
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_LINEAR = ATTENTION + ("gate_proj", "up_proj", "down_proj")
GB = 1e9

# Bytes per weight of a quantized linear layer. int8 (LLM.int8): one byte, plus an fp32 scale per
# output row (counted separately). nf4 with double quantization, as QLoRA and `load_model(quantize=
# "4bit")` use it: half a byte, plus an 8-bit absmax per 64-weight block and an fp32 constant per 256
# blocks. bitsandbytes leaves embeddings, norms and the output head in bf16.
NF4_BYTES = 0.5 + (1 + 4 / 256) / 64


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool = False


def shape_of(config) -> Shape:
    """The sizes that matter here, from a dict of LLaMA config keys or a transformers config."""
    get = config.get if isinstance(config, dict) else (lambda key, default=None: getattr(config, key, default))
    hidden, heads = get("hidden_size"), get("num_attention_heads")
    return Shape(hidden, get("num_hidden_layers"), heads, get("num_key_value_heads") or heads,
                 get("head_dim") or hidden // heads, get("intermediate_size"), get("vocab_size"),
                 bool(get("tie_word_embeddings", False)))


def linear_shapes(config) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear layer of one decoder layer."""
    s = shape_of(config)
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    return {"q_proj": (s.hidden, q), "k_proj": (s.hidden, kv), "v_proj": (s.hidden, kv), "o_proj": (q, s.hidden),
            "gate_proj": (s.hidden, s.intermediate), "up_proj": (s.hidden, s.intermediate),
            "down_proj": (s.intermediate, s.hidden)}


def linear_param_count(config) -> int:
    """Weights in the decoder layers' linear layers: the ones quantization shrinks."""
    return shape_of(config).layers * sum(i * o for i, o in linear_shapes(config).values())


def param_count(config) -> int:
    """All parameters: linear layers, two RMSNorms a layer, the final norm, embeddings and head."""
    s = shape_of(config)
    return linear_param_count(config) + (2 * s.layers + 1) * s.hidden + s.vocab * s.hidden * (1 if s.tied else 2)


def meta_param_count(config) -> int:
    """The exact count from transformers' own model class, built on the meta device (no memory)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, LlamaConfig

    if isinstance(config, dict):
        config = LlamaConfig(**config)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # accelerate's meta parameters come untied; a tied head would count twice
    return sum(p.numel() for p in model.parameters())


def weight_bytes(config, fmt: str = "bf16") -> float:
    """Bytes of the weights when the decoder's linear layers are stored as bf16, int8 or nf4."""
    s, linear = shape_of(config), linear_param_count(config)
    rest = 2 * (param_count(config) - linear)  # embeddings, head and norms stay bf16
    if fmt == "bf16":
        return 2 * linear + rest
    if fmt == "int8":
        return linear + 4 * s.layers * sum(o for _, o in linear_shapes(config).values()) + rest
    if fmt == "nf4":
        return NF4_BYTES * linear + rest
    raise ValueError(f"fmt must be bf16, int8 or nf4, got {fmt!r}")


def kv_bytes_per_token(config, bytes_per_value: int = 2) -> int:
    """Bytes of K and V that one token adds to the cache, over all layers."""
    s = shape_of(config)
    return 2 * s.layers * s.kv_heads * s.head_dim * bytes_per_value


def lora_param_count(config, rank: int = 16, targets=ATTENTION) -> int:
    """LoRA parameters: r x (in + out) for every targeted linear layer of every decoder layer."""
    shapes = linear_shapes(config)
    return shape_of(config).layers * sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets)


# ---- memory plan ---------------------------------------------------------------------------------

@dataclass
class TrainPlan:
    """LoRA training settings and the memory assumptions behind `memory_plan`."""

    rank: int = 16
    targets: tuple[str, ...] = ATTENTION
    micro_batch: int = 4  # sequences per GPU per forward pass
    seq_len: int = 512  # the cutoff (768 for verbose cloning)
    gradient_checkpointing: bool = True
    # fp32 adapter weight (PEFT keeps adapters in fp32, so no separate master copy), fp32 gradient,
    # AdamW's two fp32 moments.
    lora_state_bytes: int = 16
    # Bytes a layer keeps per token and hidden unit for its backward without checkpointing: 34 for
    # bf16 with flash attention (Korthikanti et al. 2022, no s^2 term), an upper bound under LoRA.
    activation_factor: float = 34
    logit_bytes: float = 10  # per token and vocab entry: bf16 logits, an fp32 copy for the loss, its gradient
    overhead_gb: float = 2.0  # CUDA context, cuBLAS workspaces, allocator fragmentation


def activation_bytes(config, plan: TrainPlan) -> float:
    """Rough activation memory per GPU for one micro-batch."""
    s, tokens = shape_of(config), plan.micro_batch * plan.seq_len
    if plan.gradient_checkpointing:  # every layer's input kept, one layer's full set while it is recomputed
        layers = s.layers * tokens * s.hidden * 2 + tokens * s.hidden * plan.activation_factor
    else:
        layers = s.layers * tokens * s.hidden * plan.activation_factor
    return layers + tokens * s.vocab * plan.logit_bytes


def memory_plan(config, plan: TrainPlan | None = None, card_gb: float = 80, fsdp_gpus: int = 8,
                gen_gpus: int = 8, gen_batch: int = 64, gen_context: int = 2048) -> list[dict]:
    """Per-GPU memory (GB) of LoRA training three ways, and of bf16 generation, against `card_gb`.

    FSDP shards the frozen bf16 weights and the LoRA state over `fsdp_gpus` and gathers two layers at
    a time (the one computing and the one prefetched). Generation splits weights and the KV cache of
    `gen_batch` sequences of `gen_context` tokens over `gen_gpus` (tensor parallel).
    """
    plan = plan or TrainPlan()
    s = shape_of(config)
    lora = lora_param_count(config, plan.rank, plan.targets) * plan.lora_state_bytes
    acts = activation_bytes(config, plan)
    gathered = 2 * 2 * linear_param_count(config) / s.layers
    rows = [
        (f"bf16 LoRA, FSDP over {fsdp_gpus} GPUs", fsdp_gpus, weight_bytes(config) / fsdp_gpus + gathered,
         lora / fsdp_gpus, acts, 0.0),
        ("8-bit LoRA, one GPU", 1, weight_bytes(config, "int8"), lora, acts, 0.0),
        ("4-bit QLoRA (nf4), one GPU", 1, weight_bytes(config, "nf4"), lora, acts, 0.0),
        (f"bf16 generation, {gen_gpus} GPUs, batch {gen_batch} x {gen_context} tokens", gen_gpus,
         weight_bytes(config) / gen_gpus, 0.0, 0.0, kv_bytes_per_token(config) * gen_batch * gen_context / gen_gpus),
    ]
    out = []
    for name, gpus, weights, lora_b, act_b, kv_b in rows:
        total = (weights + lora_b + act_b + kv_b) / GB + plan.overhead_gb
        out.append({"configuration": name, "gpus": gpus, "weights_gb": weights / GB, "lora_state_gb": lora_b / GB,
                    "activations_gb": act_b / GB, "kv_cache_gb": kv_b / GB, "overhead_gb": plan.overhead_gb,
                    "total_gb_per_gpu": total, "card_gb": card_gb, "fits": total <= card_gb})
    return out


def plan_table(config=LLAMA_65B, plan: TrainPlan | None = None, **kwargs):
    """`memory_plan` as a DataFrame, plus the parameter counts it rests on in `.attrs`."""
    import pandas as pd

    plan = plan or TrainPlan()
    table = pd.DataFrame(memory_plan(config, plan, **kwargs))
    table.attrs.update(params=param_count(config), lora_params=lora_param_count(config, plan.rank, plan.targets),
                       kv_bytes_per_token=kv_bytes_per_token(config), plan=asdict(plan))
    return table


# ---- cost model ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class GPU:
    name: str
    memory_gb: float
    read_bytes_per_s: float  # datasheet; a read kernel reaches ~90% of it
    bf16_flops: float  # dense peak


H100 = GPU("H100 SXM", 80, 3.35e12, 989e12)
H200 = GPU("H200 SXM", 141, 4.8e12, 989e12)
A100 = GPU("A100 SXM 80GB", 80, 2.0e12, 312e12)


@dataclass
class Throughput:
    """Tokens per second per GPU while reading the prompt (prefill) and while generating (decode)."""

    prefill: float
    decode: float
    source: str = "assumed"


@dataclass
class GenerationStage:
    name: str
    outputs: int  # completions generated (before any filter)
    prompt_tokens: int  # per completion, not counting the shared prefix
    new_tokens: int  # per completion, mean
    shared_prefix_tokens: int = 0
    prefix_cached: bool = True  # the prefix's K/V computed once, not once per completion
    note: str = ""

    @property
    def mean_decode_context(self) -> float:
        return self.shared_prefix_tokens + self.prompt_tokens + self.new_tokens / 2


@dataclass
class TrainingStage:
    name: str
    examples: int
    tokens_per_example: int  # mean, after the cutoff
    epochs: float = 1.0
    lora: bool = True
    note: str = ""


@dataclass
class CostAssumptions:
    gpu: GPU = H100
    # FLOPs utilisation of training (recomputation counted) and of prefill. Measured on an H200:
    # LoRA on a LLaMA-7B shape, micro-batch 4 x 512, checkpointed, 6N FLOPs a token -> 24%
    # (benchmarks/RESULTS.md). 65B's larger matrices should do better; this is what was seen.
    mfu: float = 0.24
    gradient_checkpointing: bool = True  # the forward runs twice


def train_flops_per_token(params: float, lora: bool, gradient_checkpointing: bool) -> float:
    """Forward 2N; backward 2N for the activation gradients, which flow through frozen weights too,
    plus 2N for weight gradients, which LoRA skips (its own adapters' FLOPs are negligible); another
    2N when gradient checkpointing recomputes the forward. So LoRA 4N (6N checkpointed), full 6N (8N)."""
    return params * (2 + 2 + (0 if lora else 2) + (2 if gradient_checkpointing else 0))


def roofline_throughput(config, gpu: GPU = H100, batch: int = 64, context: float = 2048,
                        floor_fraction: float = 0.6, mfu: float = 0.4) -> Throughput:
    """Tokens/s per GPU if decoding reaches `floor_fraction` of the memory floor and prefill `mfu`.

    A decode step reads the bf16 weights and the K/V of `batch` sequences at `context` tokens and
    yields `batch` tokens; split over g GPUs, each reads 1/g of it, so per GPU it is
    batch x bandwidth / bytes whatever g is (communication ignored). Prefill costs 2N FLOPs a token.
    """
    step_bytes = weight_bytes(config) + kv_bytes_per_token(config) * batch * context
    return Throughput(prefill=mfu * gpu.bf16_flops / (2 * param_count(config)),
                      decode=floor_fraction * gpu.read_bytes_per_s * batch / step_bytes,
                      source=f"roofline: {gpu.name}, batch {batch}, context {context:g}, "
                             f"{floor_fraction:.0%} of the memory floor, prefill at {mfu:.0%} MFU")


def stage_cost(stage, params: float, throughput: Throughput | None, assume: CostAssumptions) -> dict:
    """GPU-hours of one stage, with the token and FLOP counts behind them."""
    if isinstance(stage, GenerationStage):
        if stage.prefix_cached:  # computed once (per GPU too, which is negligible)
            prefill = stage.outputs * stage.prompt_tokens + stage.shared_prefix_tokens
        else:
            prefill = stage.outputs * (stage.prompt_tokens + stage.shared_prefix_tokens)
        decode = stage.outputs * stage.new_tokens
        seconds = prefill / throughput.prefill + decode / throughput.decode
        return {"stage": stage.name, "kind": "generation", "prefill_tokens": prefill, "decode_tokens": decode,
                "train_tokens": 0, "flops": 2 * params * (prefill + decode), "gpu_hours": seconds / 3600,
                "assumptions": f"{throughput.source}; {stage.note}".strip("; ")}
    tokens = round(stage.examples * stage.tokens_per_example * stage.epochs)
    flops = tokens * train_flops_per_token(params, stage.lora, assume.gradient_checkpointing)
    seconds = flops / (assume.mfu * assume.gpu.bf16_flops)
    return {"stage": stage.name, "kind": "training", "prefill_tokens": 0, "decode_tokens": 0, "train_tokens": tokens,
            "flops": flops, "gpu_hours": seconds / 3600,
            "assumptions": f"{'LoRA' if stage.lora else 'full'}, {assume.gpu.name} at {assume.mfu:.0%} MFU, "
                           f"{'checkpointed' if assume.gradient_checkpointing else 'no recompute'}; {stage.note}"}


PAPER_PROMPTS = 267_597 + 99_121  # Self-Instruct + topic-guided red-teaming prompts kept (profiles/full.yaml)
SHAPES = {"llama-7b": LLAMA_7B, "llama-65b": LLAMA_65B}


def model_shape(name_or_path: str):
    """A shape by name ("llama-7b", "llama-65b") or a model directory's config.json (read, not loaded)."""
    if name_or_path in SHAPES:
        return SHAPES[name_or_path]
    from pathlib import Path

    config = Path(name_or_path).expanduser()
    config = config / "config.json" if config.is_dir() else config
    if not config.is_file():
        raise ValueError(f"{name_or_path!r} is neither one of {sorted(SHAPES)} nor a model directory or config.json")
    import json

    return json.loads(config.read_text())


def paper_stages(prompts: int = PAPER_PROMPTS) -> list:
    """The paper's four stages on LLaMA-65B, for `prompts` kept prompts (the paper's count by
    default); what the paper does not state is marked assumed."""
    return [
        GenerationStage("red_team", 2 * prompts, 60, 40,
                        note="assumed: half the candidates survive the ROUGE-L filter; a ~300-token few-shot "
                             "list prompt yields ~5 items of ~40 tokens"),
        GenerationStage("self_align", prompts, 60, 256, shared_prefix_tokens=1800,
                        note="~1,800-token principles + exemplars prefix, cached; 256 new tokens (the "
                             "paper's maximum, an upper bound)"),
        TrainingStage("engrave", prompts, 400, note="cutoff 512, 1 epoch; assumed mean 400 tokens an example"),
        GenerationStage("verbose (teacher)", prompts, 60, 512, shared_prefix_tokens=400,
                        note="assumed ~400-token overview + verbose instruction, cached; 512 new tokens"),
        TrainingStage("verbose (student)", prompts, 600, note="cutoff 768, 1 epoch; assumed mean 600 tokens"),
    ]


# Decoding at batch 64 on an H200 (LLaMA-7B shape, benchmarks/RESULTS.md) reached 69.6% of the
# memory floor with the engine's "hf-static" backend (compiled), 58% with transformers' static
# cache + compile, and 9-10% with plain `generate` (the "hf" backend). 60% leaves room for what the
# benchmark leaves out (sampling, stop strings, ragged prompts).
DEFAULT_FLOOR_FRACTION = 0.6


def cost_table(stages=None, config=LLAMA_65B, throughput: Throughput | dict | None = None,
               assume: CostAssumptions | None = None, batch: int = 64,
               floor_fraction: float = DEFAULT_FLOOR_FRACTION, replicas: int = 1, gpus_per_replica: int = 8,
               train_gpus: int = 8):
    """GPU-hours and wall-clock hours per stage as a DataFrame (a total row last).

    `throughput`: one `Throughput` for every generation stage, a dict of them by stage name, or None
    for `roofline_throughput` at each stage's own mean decode context, `batch` and `floor_fraction`.
    Generation runs on `replicas` model replicas (the stages' `replicas` setting) of
    `gpus_per_replica` GPUs each (tensor parallel), training on `train_gpus`: `gpus` is what a stage
    runs on and `wall_hours` its GPU-hours over those GPUs. More replicas divide the wall time, not
    the GPU-hours: the per-GPU rate is the same, and a shared prefix computed once a replica rather
    than once is negligible; stragglers and start-up (each replica loads the model) are left out.
    """
    import pandas as pd

    if min(replicas, gpus_per_replica, train_gpus) < 1:
        raise ValueError(f"replicas, gpus_per_replica and train_gpus must be >= 1, got {replicas}, "
                         f"{gpus_per_replica}, {train_gpus}")
    stages = paper_stages() if stages is None else stages
    assume = assume or CostAssumptions()
    params = param_count(config)
    rows = []
    for stage in stages:
        rate = throughput.get(stage.name) if isinstance(throughput, dict) else throughput
        if rate is None and isinstance(stage, GenerationStage):
            rate = roofline_throughput(config, assume.gpu, batch, stage.mean_decode_context, floor_fraction, assume.mfu)
        row = stage_cost(stage, params, rate, assume)
        row["gpus"] = replicas * gpus_per_replica if isinstance(stage, GenerationStage) else train_gpus
        rows.append({**row, "wall_hours": row["gpu_hours"] / row["gpus"]})
    table = pd.DataFrame(rows)
    total = {"stage": "total", "kind": "", "assumptions": f"{params / 1e9:.1f}B parameters",
             "gpus": table["gpus"].max()}
    total.update({c: table[c].sum() for c in ("prefill_tokens", "decode_tokens", "train_tokens", "flops", "gpu_hours",
                                              "wall_hours")})  # the stages run one after another
    return pd.concat([table, pd.DataFrame([total])], ignore_index=True)
