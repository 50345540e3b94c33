"""Stage 4: verbose cloning. The engraved model, told to be thorough, answers again; a second
adapter learns those answers without being told (context distillation).

The teacher is the base model with stage 3's adapter, prompted with the system overview plus the
instruction in `principles/verbose_prompt.yaml`, sampled at the paper's T=0.3, top_p=0.7 with
repetition penalties. The student starts again from the base model and is trained on
(overview without the instruction, prompt, verbose answer), so the final model answers at length
with no instruction in its context. An answer that ran into max_new_tokens is cut after its last
full sentence (or word) and kept, flagged `cut_at_length`, and trained on without the end-of-answer
marker, so that it does not teach the student to stop where the teacher was cut; an empty one is
dropped. Stage 3's prompts include its identity conversations, which the teacher answers again.

The prompts are stage 3's, with the same held-out ones, so the held-out comparison measures how
much likelier the student finds the teacher's unseen answers than the base model does.

Reads: `runs/<run>/engrave/` (data.jsonl, adapter/).
Writes: `runs/<run>/verbose/` calls.jsonl (teacher generations), answers.jsonl, drops.jsonl (prompts
too long for the teacher's context), data.jsonl, loss.jsonl, checkpoints/, adapter/, comparison.jsonl.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from ..chat_format import ChatFormat, read_instruction
from ..generation import SamplingParams, engine_for
from ..config import GenerationSettings
from ..inputs import PRINCIPLES_DIR
from ..records import Run, RunError, StageFailed, provenance
from ..training import (TrainSettings, adapted_for_generation, adapter_info, fit_and_compare, load_for_training,
                        process_state, train_settings)
from .common import (check_backend, check_model, check_ranges, check_resume, check_room, drop_reasons, generate_into,
                     generation_record, principle_texts, settings_of, shortfall)

STAGE = "verbose"
_SENTENCE_END = re.compile(r"[.!?][\"')\]]?(?=\s|$)")


@dataclass
class VerboseConfig(TrainSettings, GenerationSettings):  # this order puts run, model, ... first
    instruction: str = str(PRINCIPLES_DIR / "verbose_prompt.yaml")
    limit: int = 0  # answer only the first N of stage 3's prompts (0: all)
    temperature: float = 0.3
    top_p: float = 0.7
    max_new_tokens: int = 128  # the paper: 512
    repetition_penalty: float = 1.1  # over the generated tokens only
    no_repeat_ngram_size: int = 6  # over the generated tokens only, so the teacher may quote the question
    cutoff: int = 768  # the paper's student cutoff
    epochs: int = 2  # fewer than engraving's 3: longer answers, same CPU budget (the paper: 1)
    min_examples: int = 4
    train: bool = True  # False: only generate the teacher's answers (e.g. in one process, before
    #                     training under `accelerate launch`, which then finds them done)

    def __post_init__(self):
        TrainSettings.check(self)  # the LoRA and optimiser fields; these are the stage's own:
        check_ranges(self, non_negative=("limit", "temperature", "no_repeat_ngram_size", "min_examples"),
                     positive=("max_new_tokens", "repetition_penalty"),
                     probabilities=("top_p",))
        check_backend(self.backend)


def cut_to_sentence(text: str) -> str:
    """A truncated answer up to its last full sentence; without one, up to its last whole word."""
    ends = list(_SENTENCE_END.finditer(text))
    if ends:
        return text[:ends[-1].end()].rstrip()
    return text.rsplit(None, 1)[0] if len(text.split()) > 1 else text


def run(config: VerboseConfig, loaded=None) -> dict:
    check_room(config.model, loaded, max_new_tokens=config.max_new_tokens)  # before the run's folder is made
    state = process_state()
    run_dir = Run(config.run, config.runs_dir)
    engraved = run_dir.stage("engrave")
    if not engraved.finished or not (engraved.adapter / "adapter_config.json").exists():
        raise RunError(f"run {config.run!r} has no finished stage 3 (engrave) in {engraved.path}; run it first")
    stage = run_dir.stage(STAGE)
    chat = ChatFormat.load(engraved.manifest()["params"]["template"])
    instruction = read_instruction(config.instruction)
    if config.train:
        config.accumulation_steps(state.num_processes)  # a total_batch_size these processes cannot make
    params = SamplingParams(temperature=config.temperature, top_p=config.top_p, max_new_tokens=config.max_new_tokens,
                            stop=(chat.stop,), seed=config.seed, repetition_penalty=config.repetition_penalty,
                            no_repeat_ngram_size=config.no_repeat_ngram_size)
    if config.backend == "vllm":
        from ..generation.vllm import check_sampling

        check_sampling(params)  # before the manifest records these settings, not at the first batch
    if loaded is None or config.quantize:  # a model handed in is not the quantized one asked for
        check_model(config.model, config.backend, config.quantize)
    prompts = [row for row in engraved.read("data.jsonl") if row["split"] != "dropped"][: config.limit or None]
    holdout = {row["id"] for row in prompts if row["split"] == "holdout"}
    adapter_hash = hashlib.sha256((engraved.adapter / "adapter_model.safetensors").read_bytes()).hexdigest()
    items = [(row["id"], chat.prompt(row["prompt"], instruction=instruction)) for row in prompts]
    settings = {k: v for k, v in settings_of(config).items() if k != "train"}  # a mode, not a setting
    settings = {**settings, "teacher_sha256": adapter_hash, "instruction_text": instruction}
    check_resume(stage, settings, config.restart, "calls.jsonl", items, {row["id"]: row["prompt"] for row in prompts})
    if state.is_main_process:
        stage.start(settings, restart=config.restart)
    state.wait_for_everyone()
    origin = provenance(f"{config.model}+engrave", params.to_dict(), config.seed)
    with stage.writer("calls.jsonl", "generation/1") as calls, stage.writer("drops.jsonl", "drop/1") as drops:
        pending = [row for row in prompts if row["id"] not in calls and row["id"] not in drops]
    if pending and state.num_processes > 1:
        raise RunError(f"{len(pending)} teacher answers are still to be generated; generate them in one process "
                       f"first (selfalign stage verbose --no-train), then train under accelerate launch")
    if config.backend != "vllm" and config.replicas == 1:  # vLLM and replicas load their own; training can wait
        loaded = load_for_training(config.model, train_settings(config), loaded)
    if state.is_main_process:
        _teach(stage, loaded, prompts, items, params, origin, config, run_dir)
    state.wait_for_everyone()
    if not (stage.path / "answers.jsonl").exists() or not stage.read("answers.jsonl"):
        # Nothing for the student to learn: say so now, not as too few training examples later.
        reasons = drop_reasons(stage.read("drops.jsonl")) if (stage.path / "drops.jsonl").exists() else {}
        reason = shortfall(f"the teacher answered 0 of {len(prompts)} prompts", reasons)
        if state.is_main_process:
            raise stage.fail(reason, {"prompts": len(prompts), "answers": 0, "drop_reasons": reasons})
        raise StageFailed(STAGE, reason)
    if not config.train:
        return stage.manifest()
    loaded = load_for_training(config.model, train_settings(config), loaded)

    answers = stage.read("answers.jsonl", unique="id")
    counts = fit_and_compare(stage, loaded, answers, chat, config, holdout & {a["id"] for a in answers},
                             {"stage": STAGE, "teacher_sha256": adapter_hash, "chat_format": chat.to_dict(),
                              "instruction": instruction,
                              "principles_hash": adapter_info(engraved.adapter).get("principles_hash")},
                             # The student learns to answer at length without being told to.
                             forbidden=(*principle_texts(run_dir),
                                        instruction.format(assistant=chat.assistant, developer=chat.developer)))
    if state.is_main_process:
        counts["answers"] = len(answers)
        counts["drops"] = len(stage.read("drops.jsonl"))  # prompts too long for the teacher's context
        counts["cut_at_length"] = sum(a["cut_at_length"] for a in answers)
        counts["mean_answer_words"] = round(sum(len(a["answer"].split()) for a in answers) / max(len(answers), 1), 1)
        stage.finish(counts)
    state.wait_for_everyone()
    return stage.manifest()


def _teach(stage, loaded, prompts, items, params, origin, config, run_dir) -> None:
    """The teacher's answers to the (id, teacher prompt) items into calls.jsonl and answers.jsonl
    (resumable: done ones are skipped); a prompt too long for the context goes to drops.jsonl."""
    source = {row["id"]: row for row in prompts}
    with stage.writer("calls.jsonl", "generation/1") as calls, stage.writer("answers.jsonl", "answer/1") as answers, \
            stage.writer("drops.jsonl", "drop/1") as drops:
        if any(key not in calls and key not in drops for key, _ in items):  # else no teacher to load
            def record(key, text, completion):
                return generation_record(key, text, completion, origin)

            options = dict(drops=drops, drop_fields=lambda key: {"prompt": source[key]["prompt"]},
                           prompts={key: row["prompt"] for key, row in source.items()})
            adapter = run_dir.stage("engrave").adapter
            if config.backend == "vllm" or config.replicas > 1:  # applied where the model is, by vLLM or each replica
                generate_into(calls, items, engine_for(config, adapter=str(adapter)), params, record, **options)
            else:
                with adapted_for_generation(loaded, adapter) as teacher:
                    generate_into(calls, items, engine_for(config, teacher), params, record, **options)
        for call in stage.read("calls.jsonl"):
            if call["id"] in answers or call["id"] not in source:
                continue
            text = call["completion"].strip()
            cut = call["finish_reason"] == "length"
            if cut:
                text = cut_to_sentence(text)
            # A cut answer keeps its last full sentence but gets no end-of-answer marker in training
            # (`ended`), as Dromedary's merge script leaves it: it must not teach stopping mid-answer.
            answers.write({"id": call["id"], "prompt": source[call["id"]]["prompt"], "answer": text,
                           "cut_at_length": cut, "ended": not cut, "finish_reason": call["finish_reason"],
                           "source": source[call["id"]].get("source", "self_align"),
                           "provenance": call["provenance"]})


def tables(run: str, runs_dir: str = "runs") -> dict:
    """answers, data, loss and comparison as DataFrames."""
    from .common import stage_frames

    return stage_frames(Run(run, runs_dir).stage(STAGE), {
        "answers": ["id", "prompt", "answer", "cut_at_length", "finish_reason"],
        "data": ["id", "prompt", "answer", "split", "tokens", "answer_tokens", "reason"],
        "loss": ["step", "epoch", "loss", "learning_rate", "grad_norm", "tokens"],
        "comparison": ["id", "answer_tokens", "base_logprob", "adapted_logprob"],
    })
