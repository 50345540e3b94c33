"""Every setting's range is checked before a model loads or a file is written, on every path that
builds a stage's settings (the command line, a profile or -p override, a notebook's parameters,
Python): numbers finite, counts and sizes in range, probabilities in (0, 1], lists not empty, new
tokens that leave room in the model's context, a run name without control characters. A refused
command writes nothing, so the corrected command needs no --restart."""

import json

import pytest
import yaml

from selfalign.ablation import LeaveOneOutConfig
from selfalign.cli import main
from selfalign.config import from_mapping
from selfalign.records import Run, RunError
from selfalign.stages import evaluate
from selfalign.stages.engrave import EngraveConfig
from selfalign.stages.prompts import PromptsConfig
from selfalign.stages.self_align import SelfAlignConfig
from selfalign.training import TrainSettings


# (command after `selfalign`, what the one-line error says). tiny-random's context is 8,192 tokens.
REFUSED = {
    "temperature-inf": (["stage", "baseline", "--temperature", "inf"],
                        "temperature must be a finite number, got inf"),
    "temperature-nan": (["stage", "self-align", "--temperature", "nan"], "temperature must be a finite number, got nan"),
    "top-p-nan": (["stage", "baseline", "--top-p", "nan"], "top_p must be a finite number, got nan"),
    "top-p-zero": (["stage", "self-align", "--top-p", "0"], "top_p must be in (0, 1], got 0.0"),
    "rouge-threshold-2": (["stage", "prompts", "--rouge-threshold", "2"], "rouge_threshold must be in (0, 1], got 2.0"),
    "repetition-penalty-inf": (["stage", "verbose", "--repetition-penalty", "inf"],
                               "repetition_penalty must be a finite number, got inf"),
    "benchmarks-none": (["stage", "evaluate", "--benchmarks"], "benchmarks must not be empty"),
    "benchmarks-unknown": (["stage", "evaluate", "--benchmarks", "mmlu"], "unknown benchmarks ['mmlu']"),
    "batch-size-zero": (["stage", "evaluate", "--batch-size", "0"], "batch_size must be > 0, got 0"),
    "lora-alpha-inf": (["stage", "engrave", "--lora-alpha", "inf"], "lora_alpha must be a finite number, got inf"),
    "max-grad-norm-zero": (["stage", "engrave", "--max-grad-norm", "0"], "max_grad_norm must be > 0, got 0.0"),
    "weight-decay-negative": (["stage", "verbose", "--weight-decay", "-1"], "weight_decay must be >= 0, got -1.0"),
    "target-modules-none": (["stage", "engrave", "--target-modules"], "target_modules must not be empty"),
    "rank-zero": (["stage", "engrave", "--rank", "0"], "rank must be > 0, got 0"),
    "loo-max-new-tokens-zero": (["leave-one-out", "--loo-max-new-tokens", "0"], "loo_max_new_tokens must be > 0"),
    "max-new-tokens-1e9": (["stage", "baseline", "--max-new-tokens", "1000000000"],
                           "max_new_tokens=1000000000 leaves no room for a prompt in the context of model "
                           "'tiny-random' (8192 tokens)"),
    "max-new-tokens-whole-context": (["stage", "self-align", "--max-new-tokens", "8192"],
                                     "max_new_tokens=8192 leaves no room for a prompt"),
    "teacher-max-new-tokens": (["stage", "verbose", "--max-new-tokens", "9000"], "max_new_tokens=9000 leaves no room"),
    "vicuna-max-new-tokens": (["stage", "evaluate", "--benchmarks", "vicuna", "--max-new-tokens", "1000000000"],
                              "max_new_tokens=1000000000 leaves no room"),
    "list-max-new-tokens": (["stage", "prompts", "--list-max-new-tokens", "9000"],
                            "list_max_new_tokens=9000 leaves no room"),
    # a mixed request asks for question_max_new_tokens for each of its questions_per_request hints
    "mixed-request-new-tokens": (["stage", "prompts", "--red-team-scheme", "mixed", "--question-max-new-tokens",
                                  "2000", "--questions-per-request", "5"],
                                 "question_max_new_tokens=10000 leaves no room"),
    "run-name-newline": (["stage", "baseline", "--run", "r\n"], r"run name 'r\n' must be letters"),
    "run-name-tab": (["stage", "baseline", "--run", "r\tx"], r"run name 'r\tx' must be letters"),
    "run-name-escape": (["status", "--run", "r\x1b[2J"], r"run name 'r\x1b[2J' must be letters"),
    "run-name-carriage-return": (["run", "--dry-run", "--run", "r\r"], r"run name 'r\r' must be letters"),
    "override-infinity": (["run", "--dry-run", "-p", "temperature", "Infinity"],
                          "temperature must be a finite number, got inf"),
    "override-nan": (["run", "--direct", "-p", "self-align.top_p", "NaN"], "top_p must be a finite number, got nan"),
    "override-no-benchmarks": (["run", "--direct", "-p", "evaluate.benchmarks", "[]"], "benchmarks must not be empty"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_a_setting_out_of_range_is_refused_before_anything_is_written(case, tmp_path, capsys):
    argv, message = REFUSED[case]
    runs = tmp_path / "runs"
    argv = [*argv, "--runs-dir", str(runs)] + (["--model", "tiny-random"] if argv[0] != "status" else [])
    assert main(argv) == 1
    error = capsys.readouterr().err
    assert error.startswith("selfalign: error: ") and error.count("\n") == 1  # one line, no traceback
    assert message in error
    assert not runs.exists()  # no run folder, so no manifest that would refuse the corrected command


def test_a_profile_with_an_infinite_value_is_refused_by_name(tmp_path, capsys):
    profile = tmp_path / "p.yaml"
    profile.write_text(yaml.safe_dump({"baseline": {"temperature": float("inf")}}))
    assert main(["run", "--dry-run", "--profile", str(profile), "--runs-dir", str(tmp_path / "runs")]) == 1
    printed = capsys.readouterr()
    assert printed.err == "selfalign: error: stage 'baseline': temperature must be a finite number, got inf\n"
    assert not printed.out and not (tmp_path / "runs").exists()  # no settings shown as if they were usable


@pytest.mark.parametrize("config_class, values, message", [
    (SelfAlignConfig, {"temperature": float("nan")}, "temperature must be a finite number, got nan"),
    (PromptsConfig, {"rouge_threshold": 2}, r"rouge_threshold must be in \(0, 1\], got 2"),
    (PromptsConfig, {"list_top_p": float("inf")}, "list_top_p must be a finite number, got inf"),
    (evaluate.EvaluateConfig, {"benchmarks": []}, "benchmarks must not be empty"),
    (EngraveConfig, {"lora_dropout": float("nan")}, "lora_dropout must be a finite number, got nan"),
    (EngraveConfig, {"epochs": 2.5}, "epochs must be a whole number, got 2.5"),
    (EngraveConfig, {"holdout": float("nan")}, "holdout must be a finite number"),
    (LeaveOneOutConfig, {"seed": "7"}, "seed must be a whole number, got '7'"),
])
def test_notebook_parameters_are_checked_as_the_command_line_is(config_class, values, message):
    with pytest.raises(ValueError, match=message):
        from_mapping(config_class, values)  # a notebook's parameters cell, as papermill hands it over


def test_every_float_setting_of_every_stage_refuses_infinity_and_nan():
    """A float setting added later is checked too: the check reads the dataclass's fields."""
    import dataclasses
    import typing

    from selfalign.profiles import STAGES

    for name, (config_class, _) in {**STAGES, "leave-one-out": (LeaveOneOutConfig, None)}.items():
        hints = typing.get_type_hints(config_class)
        for field in dataclasses.fields(config_class):
            if hints[field.name] is float:
                for value in (float("inf"), float("-inf"), float("nan")):
                    with pytest.raises(ValueError, match=f"{field.name} must be a finite number"):
                        config_class(**{field.name: value})


def test_train_settings_name_every_problem_in_one_line():
    with pytest.raises(ValueError) as refused:
        TrainSettings(rank=0, lora_alpha=float("inf"), target_modules=(), lora_dropout=1.0).check()
    assert str(refused.value) == ("lora_alpha must be a finite number, got inf; rank must be > 0, got 0; "
                                  "target_modules must not be empty; lora_dropout must be in [0, 1), got 1.0")


def test_a_model_directory_names_its_own_context(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 512}))
    assert main(["stage", "baseline", "--model", str(model), "--max-new-tokens", "512",
                 "--runs-dir", str(tmp_path / "runs")]) == 1
    assert f"in the context of model '{model}' (512 tokens)" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_run_name_with_a_control_character_is_refused_wherever_it_is_read(tmp_path):
    for name in ("r\n", "r\x00", "\nr", "r\u2028"):
        with pytest.raises(RunError, match="run name"):
            Run(name, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_judge_that_does_not_load_fails_before_the_manifest_records_it(tmp_path, tiny, public_data):
    """The judge is loaded before the stage starts: when it fails, nothing records its name, so the
    corrected command (another judge, or none) is not refused as a change of settings."""
    import torch
    from safetensors.torch import save_file

    from selfalign.chat_format import ChatFormat

    judge = tmp_path / "judge"
    judge.mkdir()
    (judge / "config.json").write_text(json.dumps({"model_type": "llama"}))  # passes check_model, fails to load
    engraved = Run("r", tmp_path).stage("engrave")
    engraved.start({"chat_format": ChatFormat.load().to_dict()})
    (engraved.adapter).mkdir()
    (engraved.adapter / "adapter_config.json").write_text("{}")
    save_file({"unused": torch.zeros(1)}, engraved.adapter / "adapter_model.safetensors")  # whole weights
    engraved.finish({})
    config = evaluate.EvaluateConfig(run="r", runs_dir=str(tmp_path), model="tiny-random", benchmarks=("vicuna",),
                                     data_dir=str(public_data), judge=str(judge), vicuna_limit=1)
    assert list(evaluate.models_of(Run("r", tmp_path))) == ["base", "engraved"]  # so the judge is needed
    with pytest.raises(Exception, match="no tokenizer could be read"):
        evaluate.run(config, loaded=tiny)
    stage = Run("r", tmp_path).stage("evaluate")
    assert stage.manifest() is None and list(stage.path.iterdir()) == []
