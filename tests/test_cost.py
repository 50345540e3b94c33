"""The cost model and memory plan against hand computations (no weights allocated)."""

import pytest
from transformers import LlamaConfig

from selfalign import cost

SMALL = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=160, vocab_size=500)


def test_llama_parameter_counts():
    # per layer: 4 d^2 attention + 3 d ff MLP + 2 d norms; plus embeddings, head and final norm
    assert cost.param_count(cost.LLAMA_7B) == 32 * (4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096) + 2 * 32000 * 4096 + 4096
    assert cost.param_count(cost.LLAMA_7B) == pytest.approx(6.74e9, rel=1e-3)
    assert cost.param_count(cost.LLAMA_65B) == pytest.approx(65.2e9, rel=2e-3)


@pytest.mark.parametrize("config", [SMALL, dict(SMALL, tie_word_embeddings=True), LlamaConfig(**SMALL)])
def test_closed_form_count_matches_the_meta_model(config):
    assert cost.param_count(config) == cost.meta_param_count(config)


def test_meta_count_of_llama_7b():
    assert cost.meta_param_count(cost.LLAMA_7B) == cost.param_count(cost.LLAMA_7B)


def test_kv_bytes_per_token():
    assert cost.kv_bytes_per_token(cost.LLAMA_7B) == 2 * 32 * 4096 * 2 == 524_288
    # grouped-query attention: 2 K/V heads of 16 dims
    assert cost.kv_bytes_per_token(SMALL, bytes_per_value=1) == 2 * 3 * 2 * 16


def test_lora_parameter_counts():
    assert cost.lora_param_count(cost.LLAMA_7B, rank=16) == 32 * 4 * (4096 * 16 + 16 * 4096) == 16_777_216
    per_layer = 4 * (4096 + 4096) + 2 * (4096 + 11008) + (11008 + 4096)
    assert cost.lora_param_count(cost.LLAMA_7B, rank=8, targets=cost.ALL_LINEAR) == 32 * 8 * per_layer
    # GQA: k and v project 64 -> 32
    assert cost.lora_param_count(SMALL, rank=2) == 3 * 2 * ((64 + 64) + 2 * (64 + 32) + (64 + 64))


def test_weight_bytes_by_format():
    linear = 3 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 160)
    rest = cost.param_count(SMALL) - linear
    assert cost.linear_param_count(SMALL) == linear
    assert cost.weight_bytes(SMALL) == 2 * cost.param_count(SMALL)
    row_scales = 4 * 3 * (64 + 32 + 32 + 64 + 160 + 160 + 64)
    assert cost.weight_bytes(SMALL, "int8") == linear + row_scales + 2 * rest
    assert cost.weight_bytes(SMALL, "nf4") == pytest.approx(linear * (0.5 + 1 / 64 + 4 / (64 * 256)) + 2 * rest)
    with pytest.raises(ValueError):
        cost.weight_bytes(SMALL, "fp8")


def test_generation_gpu_hours_by_hand():
    stage = cost.GenerationStage("s", outputs=1000, prompt_tokens=100, new_tokens=200)
    row = cost.stage_cost(stage, 1e9, cost.Throughput(prefill=10_000, decode=100), cost.CostAssumptions())
    assert row["gpu_hours"] == pytest.approx((1000 * 100 / 10_000 + 1000 * 200 / 100) / 3600)
    cached = cost.GenerationStage("s", 1000, 100, 200, shared_prefix_tokens=500)
    assert cost.stage_cost(cached, 1e9, cost.Throughput(1, 1), cost.CostAssumptions())["prefill_tokens"] == 100_500
    cached.prefix_cached = False
    assert cost.stage_cost(cached, 1e9, cost.Throughput(1, 1), cost.CostAssumptions())["prefill_tokens"] == 600_000


def test_training_gpu_hours_by_hand():
    gpu = cost.GPU("toy", 80, 1e12, 1e15)
    stage = cost.TrainingStage("t", examples=1000, tokens_per_example=1000)
    # LoRA: 2N forward + 2N activation gradients + 2N recomputed forward = 6N per token
    row = cost.stage_cost(stage, 1e9, None, cost.CostAssumptions(gpu=gpu, mfu=0.5))
    assert row["flops"] == 6e15 and row["gpu_hours"] == pytest.approx(12 / 3600)
    full = cost.TrainingStage("t", 1000, 1000, lora=False)
    no_recompute = cost.CostAssumptions(gpu=gpu, gradient_checkpointing=False)
    assert cost.stage_cost(full, 1e9, None, no_recompute)["flops"] == 6e15


def test_roofline_throughput_by_hand():
    gpu = cost.GPU("toy", 80, 1e12, 1e15)
    rate = cost.roofline_throughput(cost.LLAMA_7B, gpu, batch=8, context=100, floor_fraction=0.5, mfu=0.5)
    step_bytes = 2 * 6_738_415_616 + 524_288 * 8 * 100
    assert rate.decode == pytest.approx(0.5 * 1e12 * 8 / step_bytes)
    assert rate.prefill == pytest.approx(0.5 * 1e15 / (2 * 6_738_415_616))


def test_memory_plan_of_65b():
    plan = cost.TrainPlan(micro_batch=1, seq_len=512)
    rows = {r["configuration"].split(",")[0]: r for r in cost.memory_plan(cost.LLAMA_65B, plan, card_gb=80)}
    qlora = rows["4-bit QLoRA (nf4)"]
    lora_gb = cost.lora_param_count(cost.LLAMA_65B) * 16 / 1e9
    # 80 layers' inputs (bf16) + one layer recomputed (34 B) + logits (10 B a vocab entry)
    acts_gb = (80 * 512 * 8192 * 2 + 512 * 8192 * 34 + 512 * 32000 * 10) / 1e9
    assert qlora["lora_state_gb"] == pytest.approx(lora_gb)
    assert qlora["activations_gb"] == pytest.approx(acts_gb)
    assert qlora["total_gb_per_gpu"] == pytest.approx(cost.weight_bytes(cost.LLAMA_65B, "nf4") / 1e9 + lora_gb
                                                      + acts_gb + plan.overhead_gb)
    assert qlora["fits"] and 30 < qlora["weights_gb"] < 40
    assert rows["bf16 LoRA"]["weights_gb"] == pytest.approx(130.57 / 8 + 4 * 80 * (4 * 8192**2 + 3 * 8192 * 22016) / 80
                                                            / 1e9, rel=1e-4)
    assert not cost.memory_plan(cost.LLAMA_65B, plan, card_gb=32)[2]["fits"]


def test_tables_for_the_book():
    plan = cost.plan_table()
    assert len(plan) == 4 and plan.attrs["params"] == cost.param_count(cost.LLAMA_65B)
    table = cost.cost_table()
    assert list(table["stage"])[-1] == "total"
    assert table["gpu_hours"].iloc[-1] == pytest.approx(table["gpu_hours"].iloc[:-1].sum())
    assert (table["gpu_hours"].iloc[:-1] > 0).all() and table["assumptions"].str.len().min() > 0
    fixed = cost.cost_table(throughput=cost.Throughput(prefill=3000, decode=300))
    align = fixed.set_index("stage").loc["self_align"]
    assert align["gpu_hours"] == pytest.approx((align["prefill_tokens"] / 3000 + align["decode_tokens"] / 300) / 3600)


def test_model_shape_by_name_or_config_file(tmp_path):
    import json

    assert cost.model_shape("llama-65b") == cost.LLAMA_65B
    (tmp_path / "config.json").write_text(json.dumps({**cost.LLAMA_7B, "model_type": "llama"}))
    assert cost.param_count(cost.model_shape(str(tmp_path))) == cost.param_count(cost.LLAMA_7B)
    with pytest.raises(ValueError, match="neither"):
        cost.model_shape(str(tmp_path / "absent"))


def test_stage_costs_scale_with_the_prompt_count():
    full, tenth = cost.cost_table(cost.paper_stages()), cost.cost_table(cost.paper_stages(cost.PAPER_PROMPTS // 10))
    # Every token count is proportional to the prompts, except the shared prefixes computed once.
    assert tenth["decode_tokens"].iloc[-1] * 10 == pytest.approx(full["decode_tokens"].iloc[-1], rel=1e-4)
    assert tenth["train_tokens"].iloc[-1] * 10 == pytest.approx(full["train_tokens"].iloc[-1], rel=1e-4)


def test_replicas_divide_the_wall_time_not_the_gpu_hours():
    stages = [cost.GenerationStage("g", outputs=1000, prompt_tokens=100, new_tokens=200),
              cost.TrainingStage("t", examples=1000, tokens_per_example=1000)]
    rate = cost.Throughput(prefill=10_000, decode=100)
    one, four = (cost.cost_table(stages, cost.LLAMA_7B, rate, replicas=n, gpus_per_replica=2, train_gpus=8)
                 .set_index("stage") for n in (1, 4))
    assert list(one["gpu_hours"]) == list(four["gpu_hours"])
    generation = (1000 * 100 / 10_000 + 1000 * 200 / 100) / 3600  # GPU-hours, as in the hand computation above
    assert one.loc["g", "gpus"] == 2 and four.loc["g", "gpus"] == 8
    assert one.loc["g", "wall_hours"] == pytest.approx(generation / 2)
    assert four.loc["g", "wall_hours"] == pytest.approx(generation / 8)
    assert four.loc["t", "wall_hours"] == one.loc["t", "wall_hours"] == pytest.approx(one.loc["t", "gpu_hours"] / 8)
    assert four.loc["total", "wall_hours"] == pytest.approx(four.loc["g", "wall_hours"] + four.loc["t", "wall_hours"])
    with pytest.raises(ValueError, match="replicas"):
        cost.cost_table(stages, cost.LLAMA_7B, rate, replicas=0)
