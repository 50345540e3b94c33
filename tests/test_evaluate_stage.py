"""Stage 5 on the tiny random model: every model of a run on the same sampled items, resumably."""

import contextlib
import json

import pytest

from selfalign import evals as ev
from selfalign.models import ModelError
from selfalign.records import Run, RunError
from selfalign.stages import engrave, evaluate
from selfalign.chat_format import ChatFormat
from conftest import REPO

CAMEL = {**ChatFormat.load().to_dict(), "assistant": "Camel"}


def test_sample_is_seeded_and_keeps_order():
    items = list(range(100))
    chosen = evaluate.sample(items, 10, seed=3)
    assert len(chosen) == 10 and chosen == sorted(chosen)
    assert evaluate.sample(items, 10, seed=3) == chosen and evaluate.sample(items, 10, seed=4) != chosen
    assert evaluate.sample(items, 0, seed=3) == items and evaluate.sample(items, 500, seed=3) == items


def test_bad_benchmarks_and_missing_data_are_errors(tmp_path, tiny):
    with pytest.raises(ValueError, match="unknown benchmarks"):
        evaluate.run(evaluate.EvaluateConfig(run="r", runs_dir=str(tmp_path), benchmarks=("mmlu",)), loaded=tiny)
    with pytest.raises(RunError, match="benchmark data not found"):
        evaluate.run(evaluate.EvaluateConfig(run="r", runs_dir=str(tmp_path), data_dir=str(tmp_path)),
                     loaded=tiny)
    assert evaluate.available(tmp_path) == ()


@pytest.mark.slow  # stages 3 and 5 on both shapes: about 13 s
def test_base_and_engraved_models_on_every_benchmark_then_resume(tmp_path, shape, public_data, monkeypatch):
    model, tiny = shape
    runs = str(tmp_path)
    # A run trained under another name: the stage must ask in its format, not the default one.
    template = tmp_path / "camel.yaml"
    template.write_text((REPO / "principles" / "engrave_template.yaml").read_text().replace(
        "assistant: Dromedary", "assistant: Camel"))
    assert ChatFormat.load(template).to_dict() == CAMEL
    engrave.run(engrave.EngraveConfig(run="r", runs_dir=runs, model=model, epochs=3, learning_rate=0.05,
                                      responses=str(REPO / "tests" / "data" / "responses.jsonl"),
                                      template=str(template)), loaded=tiny)
    asked = []
    for name in ("truthfulqa_mc_paper", "hhh_eval", "judge_pairwise"):
        def spy(*args, _original=getattr(ev, name), _name=name, **kwargs):
            asked.append((_name, kwargs.get("chat")))
            return _original(*args, **kwargs)
        monkeypatch.setattr(ev, name, spy)
    config = evaluate.EvaluateConfig(run="r", runs_dir=runs, model=model, limit=4, vicuna_limit=2,
                                     data_dir=str(public_data), max_new_tokens=6, batch_size=4)
    manifest = evaluate.run(config, loaded=tiny)
    assert manifest["counts"]["models"] == ["base", "engraved"]
    assert manifest["params"]["chat_format"] == CAMEL
    assert manifest["params"]["chat_format_source"] == "engrave manifest"
    assert sorted(name for name, _ in asked) == ["hhh_eval", "hhh_eval", "judge_pairwise",
                                                 "truthfulqa_mc_paper", "truthfulqa_mc_paper"]
    assert all(chat == ChatFormat(**CAMEL) for _, chat in asked)
    table = evaluate.comparison("r", runs)
    overall = table.set_index(["benchmark", "metric"])
    for key in [("truthfulqa_mc", "mc1"), ("truthfulqa_mc", "mc2"), ("truthfulqa_mc_paper", "mc1"),
                ("hhh", "acc_total"), ("hhh", "acc_mean"), ("hhh", "acc_ab"), ("vicuna_pairwise", "win")]:
        assert key in overall.index, key
    assert overall.loc[("truthfulqa_mc", "mc1"), "n"] == 4
    stage = Run("r", runs).stage("evaluate")
    items = stage.read("items.jsonl")
    # The adapter was applied: the same question's log-likelihoods differ between the two models.
    best = {(i["model"], i["id"].split(":", 1)[1]): i["scores"]["best_logprob"] for i in items
            if i["benchmark"] == "truthfulqa_mc"}
    assert any(abs(best[("base", q)] - best[("engraved", q)]) > 1e-4 for (m, q) in best if m == "base")
    assert "weak judge" in (stage.path / "summary.md").read_text()
    assert (stage.path / "summary.csv").read_text().startswith("benchmark,metric,base,engraved")
    calls = stage.read("calls.jsonl")
    assert sorted(c["id"].split(":")[0] for c in calls) == ["base", "base", "engraved", "engraved"]
    assert all(c["prompt"].endswith("\n\n### Camel\n") and "### Dromedary" not in c["prompt"] for c in calls)
    # Both models' answers were decoded in the same batch, each row through its own model: they are
    # each model's answers alone (the engraved one with its adapter merged, as scoring applies it).
    from selfalign.generation import SamplingParams, engine_for
    from selfalign.training import adapted_for_generation

    params = SamplingParams(temperature=0.0, max_new_tokens=6, stop=(ChatFormat(**CAMEL).stop,))
    for label, adapter in (("base", None), ("engraved", Run("r", runs).stage("engrave").adapter)):
        mine = [c for c in calls if c["id"].startswith(label + ":")]
        with adapted_for_generation(tiny, adapter) if adapter else contextlib.nullcontext(tiny) as model:
            alone = engine_for(config, model, truncate="left").generate([c["prompt"] for c in mine], params)
        assert [c.text for c in alone] == [c["completion"] for c in mine]
    assert {c["completion"] for c in calls if c["id"].startswith("base:")} != \
        {c["completion"] for c in calls if c["id"].startswith("engraved:")}  # so that the comparison can fail
    # The base model must come back without the adapter.
    assert not any("lora" in name for name, _ in tiny.model.named_parameters())

    # A rerun finds every unit done and rewrites nothing.
    before = {name: (stage.path / name).read_text() for name in ("items.jsonl", "summary.jsonl", "calls.jsonl")}
    evaluate.run(config, loaded=tiny)
    assert {name: (stage.path / name).read_text() for name in before} == before
    answers = evaluate.vicuna_answers("r", runs, public_data)
    assert list(answers.columns[:3]) == ["question", "base", "engraved"] and len(answers) == 2
    assert set(answers["engraved vs base"]) <= {"win", "tie", "loss"}


def test_the_run_records_its_chat_format_and_a_resume_under_another_is_refused(tmp_path, shape, public_data):
    model, tiny = shape
    runs = str(tmp_path)
    assert evaluate.run_chat_format(Run("r", runs)) == ChatFormat.load()
    config = evaluate.EvaluateConfig(run="r", runs_dir=runs, model=model, benchmarks=("vicuna",),
                                     vicuna_limit=1, data_dir=str(public_data), max_new_tokens=2)
    manifest = evaluate.run(config, loaded=tiny)
    assert manifest["params"]["chat_format_source"] == evaluate.DEFAULT_FORMAT_NOTE
    assert manifest["params"]["chat_format"] == ChatFormat.load().to_dict()

    # Stage 3 now records another format: the answers already made were asked in the old one.
    Run("r", runs).stage("engrave").start({"chat_format": CAMEL})
    assert evaluate.run_chat_format(Run("r", runs)).assistant == "Camel"
    with pytest.raises(RunError, match="chat_format"):
        evaluate.run(config, loaded=tiny)


def test_without_a_stage_3_manifest_the_adapter_says_which_format(tmp_path):
    adapter = tmp_path / "r" / "engrave" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "selfalign_adapter.json").write_text(json.dumps({"base_model": "tiny-random", "base_shape": {},
                                                                "chat_format": CAMEL}))
    assert evaluate.run_chat_format(Run("r", str(tmp_path))) == ChatFormat(**CAMEL)


def test_a_damaged_adapter_is_refused_before_the_stage_starts(tmp_path, public_data):
    # A finished stage 3 whose adapter weights were cut short (a full disk, a bad copy).
    engraved = Run("r", str(tmp_path)).stage("engrave")
    engraved.start({})
    engraved.finish({})
    engraved.adapter.mkdir()
    (engraved.adapter / "adapter_config.json").write_text("{}")
    (engraved.adapter / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    config = evaluate.EvaluateConfig(run="r", runs_dir=str(tmp_path), model="tiny-random", benchmarks=["truthfulqa"],
                                     limit=1, data_dir=str(public_data))
    with pytest.raises(ModelError, match="adapter_model.safetensors"):
        evaluate.run(config)
    assert not (tmp_path / "r" / "evaluate" / "manifest.json").exists()
