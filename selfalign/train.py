"""LoRA fine-tuning shared by stages 3 and 4: the conversation format, training examples, the
training loop and adapters.

Format (`principles/engrave_template.yaml`): a short system overview (the assistant's name and
who made it; no principles, no exemplars), then `### User` / `### <Name>` turns. The answer is
followed by the next `### User` marker, learned as the end of an answer and used as the stop string
at inference. Only the answer and that marker carry loss; an example whose answer would not fit
the cutoff is dropped with its reason, never cut.

Training runs peft LoRA through accelerate, so one loop serves the CPU, one GPU, and several
processes under `accelerate launch` (DDP or FSDP, by accelerate config). The batches of every
epoch are fixed by the seed before training starts; every `checkpoint_every` optimizer steps the
adapter weights, optimizer, scheduler and random states are saved, and a killed run resumes from
the last complete checkpoint with the same batches. The result is a plain PEFT adapter directory
(`PeftModel.from_pretrained` loads it) with the tokenizer and `selfalign_adapter.json`, which names
the base model, the data and the settings.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import time
import warnings
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

from .models import LoadedModel, ModelError
from .prompts import PRINCIPLES_DIR, check_templates, read_yaml

ADAPTER_INFO = "selfalign_adapter.json"


# ---------------------------------------------------------------------------------------------
# The conversation format


@dataclass(frozen=True)
class ChatFormat:
    assistant: str
    developer: str
    overview: str
    conversation_heading: str
    user_turn: str
    assistant_turn: str
    end_of_answer: str

    @classmethod
    def load(cls, path: str | Path = PRINCIPLES_DIR / "engrave_template.yaml") -> "ChatFormat":
        data = read_yaml(path, ValueError)
        check_templates(path, data, {"overview": [], "conversation_heading": [], "user_turn": ["{text}"],
                                     "assistant_turn": ["{assistant}", "{text}"], "end_of_answer": [],
                                     "assistant": [], "developer": []}, ValueError)
        if not data["end_of_answer"].strip():
            raise ValueError(f"{path}: end_of_answer must not be blank (generation stops on it)")
        chat = cls(**{k: data[k] for k in cls.__dataclass_fields__})
        try:  # once here, so that an unknown {field} fails before a model is loaded, naming the file
            chat.prompt("question", (("earlier", "answer"),), "instruction")
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(f"{path}: a template cannot be filled in ({type(error).__name__}: {error}); its fields "
                             "are {assistant}, {developer} and {text}, and a literal brace is written twice") from None
        return chat

    @property
    def stop(self) -> str:
        return self.end_of_answer

    def system(self, instruction: str = "") -> str:
        """The overview, with an extra instruction (stage 4's verbose one) if given."""
        parts = [self.overview, instruction, self.conversation_heading]
        return "\n\n".join(p.strip() for p in parts if p.strip()).format(assistant=self.assistant,
                                                                         developer=self.developer)

    def prompt(self, user: str, history: tuple[tuple[str, str], ...] = (), instruction: str = "") -> str:
        """The text the model continues with its answer: system, earlier turns, this user turn."""
        turns = [self.system(instruction)]
        for question, answer in history:
            turns += [self.user_turn.format(text=question.strip()), self._assistant(answer.strip())]
        turns += [self.user_turn.format(text=user.strip()), self._assistant("")]
        return "\n\n".join(turns)

    def target(self, answer: str) -> str:
        """What the model learns to write after `prompt`: the answer, then the next turn's marker."""
        return f"{answer.strip()}\n\n{self.end_of_answer}"

    def _assistant(self, text: str) -> str:
        return self.assistant_turn.format(assistant=self.assistant, text=text)

    def to_dict(self) -> dict:
        return asdict(self)


def read_instruction(path: str | Path = PRINCIPLES_DIR / "verbose_prompt.yaml") -> str:
    data = read_yaml(path, ValueError)
    if not isinstance(data.get("instruction"), str) or not data["instruction"].strip():
        raise ValueError(f"{path}: 'instruction' is missing or empty")
    return data["instruction"]


def load_identity(path: str | Path, chat: ChatFormat) -> list[dict]:
    """The conversations in which the assistant introduces itself (`principles/identity.yaml`), as
    training records (id, prompt, answer, source "identity") under the chat format's names."""
    data = read_yaml(path, ValueError)
    conversations = data.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise ValueError(f"{path}: expected a non-empty 'conversations:' list of user/answer pairs")
    records = []
    for number, entry in enumerate(conversations, 1):
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) and entry[k].strip()
                                                  for k in ("user", "answer")):
            raise ValueError(f"{path}: conversation #{number} needs non-empty 'user' and 'answer' texts")
        try:
            answer = entry["answer"].format(assistant=chat.assistant, developer=chat.developer)
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(f"{path}: conversation #{number}: only {{assistant}} and {{developer}} can be "
                             f"filled in ({error})") from None
        records.append({"id": f"identity-{number}", "prompt": entry["user"].strip(), "answer": answer.strip(),
                        "source": "identity"})
    return records


# ---------------------------------------------------------------------------------------------
# Training examples


@dataclass
class Example:
    id: str
    input_ids: list[int]
    labels: list[int]  # -100 where no loss is taken (everything before the answer)

    @property
    def answer_tokens(self) -> int:
        return sum(1 for label in self.labels if label != -100)


def build_examples(records: list[dict], loaded: LoadedModel, chat: ChatFormat, cutoff: int,
                   overlong: str = "drop") -> tuple[list[Example], list[dict]]:
    """(examples, drops) from records with id, prompt and answer.

    Context and target are tokenized apart and joined, so the context's tokens are exactly those the
    model sees at inference before it starts answering. A record with `"ended": False` (an answer
    cut off by the token limit) gets no end-of-answer marker: it must not teach the model to stop
    there. An example over `cutoff` is dropped, or with overlong="truncate" (Dromedary's) keeps the
    start of its answer, again without the marker.
    """
    tokenizer = loaded.tokenizer
    examples, drops = [], []
    for record in records:
        answer = (record.get("answer") or "").strip()
        if not answer:
            drops.append({"id": record["id"], "reason": "empty answer"})
            continue
        context = tokenizer(loaded.bos_prefix + chat.prompt(record["prompt"]))["input_ids"]
        text = chat.target(answer) if record.get("ended", True) else answer
        target = tokenizer(text, add_special_tokens=False)["input_ids"]
        total = len(context) + len(target)
        if total > cutoff and overlong == "truncate" and cutoff - len(context) >= MIN_TRUNCATED_ANSWER:
            target = target[:cutoff - len(context)]
        elif total > cutoff:
            drops.append({"id": record["id"], "reason": f"longer than the cutoff ({total} > {cutoff} tokens)"})
            continue
        examples.append(Example(record["id"], context + target, [-100] * len(context) + target))
    return examples, drops


MIN_TRUNCATED_ANSWER = 8  # tokens; a prompt that leaves less room than this is dropped, not truncated


def split_holdout(ids: list[str], fraction: float, seed: int) -> set[str]:
    """Ids held out of training: the `fraction` whose seeded hash is lowest (at least one when
    fraction > 0 and there are two or more). By hash, so one id's side does not depend on the order."""
    if not 0 <= fraction < 1:
        raise ValueError(f"holdout must be in [0, 1), got {fraction}")
    if fraction == 0 or len(ids) < 2:
        return set()
    ranked = sorted(ids, key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())
    return set(ranked[:max(1, round(fraction * len(ids)))])


# ---------------------------------------------------------------------------------------------
# Settings


@dataclass
class TrainSettings:
    """LoRA and optimisation settings. The LoRA shape, learning rate and decay are the paper's; the
    epochs, warm-up and batch are sized for a CPU run on a few dozen examples (profiles/full.yaml
    has the paper's)."""

    rank: int = 16
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    learning_rate: float = 4e-4
    warmup_steps: int = 2  # the paper: 100
    epochs: int = 3  # the paper: 1
    micro_batch_size: int = 4  # examples per forward pass, per process
    grad_accum: int = 1  # micro-batches per optimizer step; effective batch = micro x accum x processes
    total_batch_size: int = 0  # >0: the effective batch; grad_accum is derived from it (the paper: 768)
    cutoff: int = 512  # longest example in tokens (the paper: 512 engraving, 768 verbose cloning)
    overlong: str = "drop"  # an example over the cutoff: "drop" it, or "truncate" its answer (the paper's)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    checkpoint_every: int = 10  # optimizer steps between checkpoints (and one at the end)
    keep_checkpoints: int = 2
    mixed_precision: str = "auto"  # auto (bf16 on a GPU that has it, else none), no, bf16, fp16
    gradient_checkpointing: bool = False  # trade compute for activation memory (65B)
    quantize: str = ""  # "": as loaded; "4bit": QLoRA (NF4 base, bitsandbytes) when the stage loads the model
    device_map: str = ""  # "": one device per process; "auto": spread one process's model over all GPUs
    allow_pickle: bool = False  # resume from a checkpoint of torch pickles (FSDP's, older ones): they can run code

    def check(self) -> None:
        problems = []
        if self.rank < 1:
            problems.append(f"rank must be >= 1, got {self.rank}")
        if self.lora_alpha <= 0:
            problems.append(f"lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            problems.append(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0 < self.learning_rate <= 0.1:
            problems.append(f"learning_rate {self.learning_rate} makes no sense for LoRA (use e.g. 1e-4 to 1e-3)")
        for name in ("epochs", "micro_batch_size", "grad_accum", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.total_batch_size < 0:
            problems.append(f"total_batch_size must be >= 0 (0: micro_batch_size x grad_accum), got {self.total_batch_size}")
        if self.overlong not in ("drop", "truncate"):
            problems.append(f"overlong must be 'drop' or 'truncate', got {self.overlong!r}")
        if self.warmup_steps < 0:
            problems.append(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.cutoff < 16:
            problems.append(f"cutoff must be at least 16 tokens, got {self.cutoff}")
        if not self.target_modules:
            problems.append("target_modules is empty")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            problems.append(f"mixed_precision must be auto, no, bf16 or fp16, got {self.mixed_precision!r}")
        if self.quantize not in ("", "4bit", "8bit"):
            problems.append(f"quantize must be '', '4bit' or '8bit', got {self.quantize!r}")
        if problems:
            raise ValueError("; ".join(problems))

    def accumulation_steps(self, processes: int) -> int:
        """Micro-batches per optimizer step on each of `processes`: grad_accum, or what makes
        total_batch_size exactly (as Dromedary's scripts derive it from TOTAL_BATCH_SIZE)."""
        if not self.total_batch_size:
            return self.grad_accum
        per_pass = self.micro_batch_size * processes
        if self.total_batch_size % per_pass:
            raise ValueError(f"total_batch_size {self.total_batch_size} is not a multiple of micro_batch_size "
                             f"{self.micro_batch_size} x {processes} processes; change one of them")
        return self.total_batch_size // per_pass


def load_for_training(name: str, settings: TrainSettings) -> LoadedModel:
    """Load the base model where this process will train it.

    Under `accelerate launch` with several processes the model is loaded on the CPU and accelerate
    moves it to each process's GPU (DDP) or shards it (FSDP); loading it straight to "cuda" would
    put every process's copy on GPU 0. A 4-bit model must be loaded onto its process's GPU.
    """
    from .models import load_model

    state = process_state()
    device_map = settings.device_map or None
    if settings.quantize and device_map is None and state.device.type == "cuda":
        device_map = {"": state.device.index or 0}
    elif device_map is None and state.num_processes > 1:
        device_map = {"": "cpu"}
    return load_model(name, quantize=settings.quantize or None, device_map=device_map)


def train_settings(config) -> TrainSettings:
    """The TrainSettings fields of a stage config (which inherits them)."""
    return TrainSettings(**{name: getattr(config, name) for name in TrainSettings.__dataclass_fields__})


def batch_schedule(n_examples: int, settings: TrainSettings, seed: int, processes: int) -> list[list[list[int]]]:
    """Every optimizer step's micro-batches (`processes * accumulation_steps` lists of example indices).

    Each epoch is its own seeded shuffle. The last step is filled up from the start of the
    schedule, so every process has work in every step (a process without one would hang the others).
    """
    rng = random.Random(seed)
    micro = []
    for _ in range(settings.epochs):
        order = list(range(n_examples))
        rng.shuffle(order)
        micro += [order[i:i + settings.micro_batch_size] for i in range(0, n_examples, settings.micro_batch_size)]
    per_step = processes * settings.accumulation_steps(processes)
    steps = math.ceil(len(micro) / per_step)
    micro += micro[: steps * per_step - len(micro)]
    return [micro[s * per_step:(s + 1) * per_step] for s in range(steps)]


# ---------------------------------------------------------------------------------------------
# Training


def train_lora(loaded: LoadedModel, examples: list[Example], settings: TrainSettings, out_dir: str | Path, *,
               seed: int = 0, data_info: dict | None = None, progress: bool = True) -> dict:
    """Train a LoRA adapter on `examples` into `out_dir/adapter`, resuming from `out_dir/checkpoints`.

    Writes `out_dir/loss.jsonl` (one record per optimizer step). Returns a summary dict. The caller's
    model comes back without LoRA layers, so the same loaded model can be trained again or compared.
    """
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    from .records import SCHEMAS, JsonlWriter

    settings.check()
    if not examples:
        raise ValueError("no training examples")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(mixed_precision=_mixed_precision(settings.mixed_precision), cpu=_no_gpu())
    main = accelerator.is_main_process
    set_seed(seed)

    base = loaded.model
    _check_targets(base, settings.target_modules)
    if settings.quantize or getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False):
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=settings.gradient_checkpointing)
    elif settings.gradient_checkpointing:
        base.gradient_checkpointing_enable()
        base.enable_input_require_grads()
    lora = LoraConfig(r=settings.rank, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                      target_modules=list(settings.target_modules), task_type="CAUSAL_LM")
    model = get_peft_model(base, lora)
    model.train()
    try:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                      lr=settings.learning_rate, weight_decay=settings.weight_decay)
        schedule = batch_schedule(len(examples), settings, seed, accelerator.num_processes)
        scheduler = get_linear_schedule_with_warmup(optimizer, settings.warmup_steps, len(schedule))
        # The scheduler is stepped here once per optimizer step; accelerate's wrapper would step it
        # once per process, so it is not prepared. `_save_checkpoint` writes it; the registration is
        # for accelerate's own format (FSDP's, and older checkpoints resumed with allow_pickle).
        model, optimizer = accelerator.prepare(model, optimizer)
        accelerator.register_for_checkpointing(scheduler)

        checkpoints = out_dir / "checkpoints"
        done = _resume(accelerator, checkpoints, model, optimizer, scheduler, settings.allow_pickle)
        pad_id = loaded.tokenizer.pad_token_id
        log = JsonlWriter(out_dir / "loss.jsonl", SCHEMAS["train_step/1"], key="step") if main else None
        bar = tqdm(total=len(schedule), initial=done, unit="step", desc="training", disable=not (progress and main))
        rank, processes = accelerator.process_index, accelerator.num_processes
        micro_per_epoch = math.ceil(len(examples) / settings.micro_batch_size)
        for step in range(done, len(schedule)):
            started = time.perf_counter()
            mine = schedule[step][rank::processes]
            total_loss, total_tokens = 0.0, 0
            for position, indices in enumerate(mine):
                batch = _collate([examples[i] for i in indices], pad_id, accelerator.device)
                last = position == len(mine) - 1
                # Gradients are averaged over processes only on the last micro-batch of a step.
                with accelerator.no_sync(model) if not last else nullcontext():
                    with accelerator.autocast():
                        loss = model(**batch).loss
                    accelerator.backward(loss / len(mine))
                total_loss += loss.detach().float().item()
                total_tokens += int((batch["labels"] != -100).sum())
            grad_norm = accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                    settings.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            mean_loss = accelerator.reduce(torch.tensor(total_loss / len(mine), device=accelerator.device),
                                           reduction="mean").item()
            if log is not None:
                log.write({"step": step + 1, "epoch": round((step + 1) * len(schedule[step]) / micro_per_epoch, 3),
                           "loss": mean_loss, "learning_rate": scheduler.get_last_lr()[0],
                           "grad_norm": float(grad_norm), "tokens": total_tokens,
                           "sequence_tokens": sum(len(examples[i].input_ids) for m in mine for i in m),
                           "seconds": round(time.perf_counter() - started, 4)})
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.3f}")
            if (step + 1) % settings.checkpoint_every == 0 or step + 1 == len(schedule):
                _save_checkpoint(accelerator, checkpoints, step + 1, settings.keep_checkpoints, model, optimizer,
                                 scheduler)
        bar.close()
        if log is not None:
            log.close()

        adapter_dir = out_dir / "adapter"
        # Under FSDP gathering the full state is collective: every process takes part.
        state = accelerator.get_state_dict(model) if accelerator.distributed_type == "FSDP" else None
        if main:
            unwrapped = accelerator.unwrap_model(model)
            unwrapped.save_pretrained(adapter_dir, state_dict=_adapter_state(unwrapped, state))
            loaded.tokenizer.save_pretrained(adapter_dir)
            info = {"base_model": loaded.name, "base_path": loaded.path, "base_shape": model_shape(loaded.model),
                    "bos_prefix": loaded.bos_prefix, "settings": json.loads(json.dumps(asdict(settings))),
                    "seed": seed, "examples": len(examples), "steps": len(schedule),
                    "processes": accelerator.num_processes, **(data_info or {})}
            (adapter_dir / ADAPTER_INFO).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
        accelerator.wait_for_everyone()
        return {"steps": len(schedule), "resumed_from": done, "examples": len(examples),
                "processes": accelerator.num_processes}
    finally:
        # Give the caller its model back without LoRA layers (the adapter is on disk).
        accelerator.free_memory()
        _strip_lora(model)
        if settings.gradient_checkpointing and getattr(loaded.model, "gradient_checkpointing_disable", None):
            loaded.model.gradient_checkpointing_disable()
        loaded.model.eval()


def _no_gpu() -> bool:
    import torch

    return not torch.cuda.is_available()


def process_state():
    """Which process this is under `accelerate launch` (one process otherwise).

    Without a GPU, accelerate counts launched processes only when told it is on the CPU; it then
    joins them with gloo. `accelerate launch --multi_gpu --num_processes 2` on a CPU machine relies
    on this (the `--cpu` flag would start a single process).
    """
    from accelerate import PartialState

    return PartialState(cpu=_no_gpu())


def _mixed_precision(choice: str) -> str:
    import torch

    if choice != "auto":
        return choice
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def _check_targets(model, targets) -> None:
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ == "Linear"})
        raise ValueError(f"target_modules {missing} are not in this model; its linear layers are {linear}")


def _collate(examples: list[Example], pad_id: int, device) -> dict:
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = [e.input_ids + [pad_id] * (width - len(e.input_ids)) for e in examples]
    labels = [e.labels + [-100] * (width - len(e.labels)) for e in examples]
    mask = [[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in examples]
    return {"input_ids": torch.tensor(ids, device=device), "labels": torch.tensor(labels, device=device),
            "attention_mask": torch.tensor(mask, device=device)}


def _adapter_state(peft_model, full_state=None) -> dict:
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(peft_model, state_dict=full_state)


class CheckpointError(ValueError):
    """A training checkpoint that cannot be resumed from; the message names it and what to do."""


CHECKPOINT_FORMAT = "safetensors+json"  # complete.json's "format"; anything else is accelerate's pickles


def _complete_checkpoints(checkpoints: Path) -> list[tuple[int, Path]]:
    found = []
    for marker in checkpoints.glob("step-*/complete.json"):
        try:
            step = json.loads(marker.read_text())["step"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # cut short or not ours: the directory is no complete checkpoint
        if isinstance(step, int):
            found.append((step, marker.parent))
    return sorted(found)


def _resume(accelerator, checkpoints: Path, model, optimizer, scheduler, allow_pickle: bool) -> int:
    complete = _complete_checkpoints(checkpoints)
    if not complete:
        return 0
    step, path = complete[-1]
    _load_checkpoint(accelerator, path, model, optimizer, scheduler, allow_pickle)
    if accelerator.is_main_process:
        print(f"resuming training from {path} (step {step})")
    return step


def _save_checkpoint(accelerator, checkpoints: Path, step: int, keep: int, model, optimizer, scheduler) -> None:
    """Write `checkpoints/step-<step>/` as safetensors and JSON, which load without running code:

        adapter.safetensors      the LoRA weights only (the frozen base would be 130 GB at 65B)
        optimizer.safetensors    the optimizer's per-parameter tensors, keyed "<param index>.<name>"
        optimizer.json           its param groups (hyperparameters) and per-parameter non-tensors
        scheduler.json           scheduler.state_dict(): numbers and lists
        scaler.json              the fp16 loss scaler's state, with mixed_precision fp16 only
        rng-<rank>.safetensors   torch's CPU (and CUDA) generator states of process <rank>
        rng-<rank>.json          python's and numpy's random states of process <rank>
        complete.json            {"step", "format"}, written last

    The main process writes all but the random states; every process writes its own, as they
    differ (dropout draws follow each process's batches). Under FSDP the adapter and optimizer are
    sharded over the processes, and accelerate's `save_state` writes them, as torch pickles:
    resuming from such a checkpoint needs allow_pickle.
    """
    import torch
    from safetensors.torch import save_file

    path = checkpoints / f"step-{step}"
    main = accelerator.is_main_process
    if main:
        if path.exists():
            shutil.rmtree(path)  # a checkpoint that was being written when the run was killed
        path.mkdir(parents=True)
    accelerator.wait_for_everyone()
    fsdp = accelerator.distributed_type == "FSDP"
    if fsdp:
        accelerator.save_state(str(path))
    else:
        rank = accelerator.process_index
        tensors, numbers = _random_states()
        save_file(tensors, str(path / f"rng-{rank}.safetensors"))
        _write_json(path / f"rng-{rank}.json", numbers)
        if main:
            adapter = _adapter_state(accelerator.unwrap_model(model))
            save_file({k: v.detach().cpu().contiguous() for k, v in adapter.items()},
                      str(path / "adapter.safetensors"))
            state = optimizer.state_dict()
            save_file({f"{index}.{name}": value.detach().cpu().contiguous()
                       for index, values in state["state"].items() for name, value in values.items()
                       if torch.is_tensor(value)}, str(path / "optimizer.safetensors"))
            others = {index: {k: v for k, v in values.items() if not torch.is_tensor(v)}
                      for index, values in state["state"].items()}
            _write_json(path / "optimizer.json", {"param_groups": state["param_groups"], "state": others})
            _write_json(path / "scheduler.json", scheduler.state_dict())
            if accelerator.scaler is not None:
                _write_json(path / "scaler.json", accelerator.scaler.state_dict())
    accelerator.wait_for_everyone()
    if main:
        from .records import write_json_atomic

        # Written last, and whole: a directory without it is an interrupted save and is never
        # resumed from.
        write_json_atomic(path / "complete.json", {"step": step, "format": "accelerate" if fsdp else CHECKPOINT_FORMAT})
        for _, old in _complete_checkpoints(checkpoints)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(accelerator, path: Path, model, optimizer, scheduler, allow_pickle: bool) -> None:
    """Restore what `_save_checkpoint` wrote: every process loads the adapter, the optimizer and the
    scheduler, and its own random states.

    A checkpoint in accelerate's format (FSDP's, and any written before selfalign wrote its own)
    holds torch pickles, which can run any code when loaded: it is refused unless allow_pickle.
    """
    from peft import set_peft_model_state_dict
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    pickled = _read_json(path / "complete.json").get("format") != CHECKPOINT_FORMAT
    if pickled and not allow_pickle:
        found = sorted(p.name for p in path.iterdir() if p.suffix in (".pkl", ".bin", ".pt")) or ["torch pickles"]
        raise CheckpointError(
            f"checkpoint {path} is in accelerate's format (FSDP's, or an older selfalign's: {', '.join(found)}), "
            "whose pickles can run any code when loaded. If this run wrote it, resume with --allow-pickle; "
            "otherwise start the stage over with --restart")

    def adapter_only(models, input_dir):
        # Older selfalign checkpoints keep the adapter apart from accelerate's files.
        adapter = Path(input_dir) / "adapter_weights.safetensors"
        if models and adapter.exists():
            set_peft_model_state_dict(accelerator.unwrap_model(models[0]), load_file(str(adapter)))
            models.clear()

    try:
        if pickled:
            accelerator.register_load_state_pre_hook(adapter_only)
            accelerator.load_state(str(path))
            return
        set_peft_model_state_dict(accelerator.unwrap_model(model), load_file(str(path / "adapter.safetensors")))
        saved = _read_json(path / "optimizer.json")
        state = {int(index): dict(values) for index, values in saved["state"].items()}
        for key, tensor in load_file(str(path / "optimizer.safetensors")).items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = tensor
        optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
        scheduler.load_state_dict(_read_json(path / "scheduler.json"))
        if accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(_read_json(path / "scaler.json"))
        rank = accelerator.process_index
        _set_random_states(load_file(str(path / f"rng-{rank}.safetensors")), _read_json(path / f"rng-{rank}.json"))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as error:
        raise CheckpointError(f"checkpoint {path} cannot be resumed from ({type(error).__name__}: {error}); "
                              "start the stage over with --restart") from error


def _random_states() -> tuple[dict, dict]:
    """This process's random states: torch's generators as uint8 tensors, python's and numpy's as JSON."""
    import numpy as np
    import torch

    tensors = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    name, keys, position, has_gauss, gauss = np.random.get_state()
    return tensors, {"python": random.getstate(), "numpy": [name, keys.tolist(), position, has_gauss, gauss]}


def _set_random_states(tensors: dict, numbers: dict) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(tensors["cpu"])
    cuda = [tensors[f"cuda.{i}"] for i in range(sum(k.startswith("cuda.") for k in tensors))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, state, gauss = numbers["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, position, has_gauss, cached = numbers["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, cached))


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data) + "\n")


def _read_json(path: Path):
    return json.loads(path.read_text())


def _strip_lora(model) -> None:
    from peft import PeftModel

    try:
        from accelerate.utils import extract_model_from_parallel

        model = extract_model_from_parallel(model)
    except ImportError:
        pass
    if isinstance(model, PeftModel):
        model.unload()


# ---------------------------------------------------------------------------------------------
# Adapters


def model_shape(model) -> dict:
    """What must match between an adapter's base model and the model it is applied to."""
    config = model.config
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "vocab_size")
    return {k: getattr(config, k, None) for k in keys}


def adapter_info(adapter_dir: str | Path) -> dict:
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ModelError(f"{adapter_dir} is not a PEFT adapter directory (no adapter_config.json)")
    path = adapter_dir / ADAPTER_INFO
    return json.loads(path.read_text()) if path.is_file() else {}


def apply_adapter(loaded: LoadedModel, adapter_dir: str | Path) -> LoadedModel:
    """The loaded model with a trained adapter applied (a new LoadedModel whose model is a PeftModel).

    Refuses an adapter trained on a model of another shape, with both shapes in the message, rather
    than peft's size-mismatch traceback; warns when only the base model's name differs.
    """
    from peft import PeftModel

    info = adapter_info(adapter_dir)
    if info:
        expected, found = info["base_shape"], model_shape(loaded.model)
        if expected != found:
            differ = {k: (expected.get(k), found.get(k)) for k in expected if expected.get(k) != found.get(k)}
            raise ModelError(f"adapter {adapter_dir} was trained on {info['base_model']!r}, a model of another "
                             f"shape (adapter's base vs this model: {differ}); load {info['base_model']!r} instead")
        if info["base_model"] != loaded.name:
            warnings.warn(f"adapter {adapter_dir} was trained on {info['base_model']!r}, applying it to "
                          f"{loaded.name!r} (same shape)", stacklevel=2)
    try:
        model = PeftModel.from_pretrained(loaded.model, str(adapter_dir))
    except (RuntimeError, ValueError) as error:
        raise ModelError(f"adapter {adapter_dir} does not fit {loaded.name!r}: {error}") from error
    model.eval()
    return LoadedModel(model, loaded.tokenizer, f"{loaded.name}+{Path(adapter_dir).parent.name}", loaded.path,
                       loaded.bos_prefix)


def remove_adapter(adapted: LoadedModel) -> None:
    """Take an applied adapter's layers out of the base model again (it is shared with the caller)."""
    _strip_lora(adapted.model)


@contextmanager
def adapted_for_generation(loaded: LoadedModel, adapter_dir: str | Path):
    """The loaded model with an adapter applied, ready for the generation engine; afterwards the
    caller's model is as it was.

    In float32 the adapter is merged into the weights while generating (on a CPU the separate LoRA
    matmuls cost nearly as much as the base ones at 135M) and subtracted again afterwards; in
    16-bit weights that round trip would leave rounding error in the base model, so it stays apart.
    """
    import torch

    adapted = apply_adapter(loaded, adapter_dir)
    merge = next(loaded.model.parameters()).dtype == torch.float32
    try:
        if merge:
            adapted.model.merge_adapter()
        yield generation_model(adapted)
    finally:
        if merge:
            adapted.model.unmerge_adapter()
        remove_adapter(adapted)


def generation_model(adapted: LoadedModel) -> LoadedModel:
    """The same weights, as the plain transformers model the generation engine drives: its forward
    has the cache arguments that PeftModel's wrapper hides. The LoRA layers stay active inside it."""
    from peft import PeftModel

    model = adapted.model.get_base_model() if isinstance(adapted.model, PeftModel) else adapted.model
    return LoadedModel(model, adapted.tokenizer, adapted.name, adapted.path, adapted.bos_prefix)


# ---------------------------------------------------------------------------------------------
# How well a model predicts answers


def answer_logprobs(model, examples: list[Example], pad_id: int, batch_size: int = 8) -> list[float]:
    """Mean log-probability per answer token of each example (the negative of its training loss)."""
    import torch

    results = []
    device = next(model.parameters()).device
    with torch.inference_mode():
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            batch = _collate(chunk, pad_id, device)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            labels = batch["labels"][:, 1:]
            picked = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            keep = labels != -100
            sums = (picked * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1)
            results += sums.tolist()
    return results


def compare_on(adapted: LoadedModel, examples: list[Example]) -> list[dict]:
    """Per example: mean answer-token log-probability under the base model (adapter disabled) and
    under the adapted model, with nothing but the training format in the context."""
    pad_id = adapted.tokenizer.pad_token_id
    with adapted.model.disable_adapter():
        base = answer_logprobs(adapted.model, examples, pad_id)
    tuned = answer_logprobs(adapted.model, examples, pad_id)
    return [{"id": e.id, "answer_tokens": e.answer_tokens, "base_logprob": b, "adapted_logprob": t}
            for e, b, t in zip(examples, base, tuned)]


def plot_loss(steps, ax=None):
    """Training loss per optimizer step from a `loss.jsonl` DataFrame."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3))
    if len(steps):
        ax.plot(steps["step"], steps["loss"], marker="o", ms=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (answer tokens)")
    return ax


# ---------------------------------------------------------------------------------------------
# What stages 3 and 4 share: records in, adapter and comparison out


def fit_and_compare(stage, loaded: LoadedModel, records: list[dict], chat: ChatFormat, config,
                    holdout_ids: set[str], data_info: dict) -> dict:
    """Turn records (id, prompt, answer) into examples, train on all but the held-out ones, then
    score the held-out answers under the base model and the adapted one. Writes the stage's
    data.jsonl (one line per record: its split or why it was dropped), loss.jsonl, adapter/ and
    comparison.jsonl. Returns the counts for the manifest."""
    from .records import JsonlWriter, SCHEMAS

    # Two writers on one stage, or a file edited by hand, can repeat an id; trained on, that answer
    # would weigh double, and `by_id` below would silently keep only one of its texts.
    repeated = sorted(key for key, n in Counter(r["id"] for r in records).items() if n > 1)
    if repeated:
        shown = ", ".join(repeated[:10]) + (f" and {len(repeated) - 10} more" if len(repeated) > 10 else "")
        raise ValueError(f"the training records repeat the ids {shown}: each id must appear once. The file "
                         "they came from is damaged (two processes writing one stage?); rerun the stage that "
                         "wrote it with --restart (its old files are kept in <stage>.previous/)")
    state = process_state()
    settings = train_settings(config)
    examples, drops = build_examples(records, loaded, chat, settings.cutoff, settings.overlong)
    train = [e for e in examples if e.id not in holdout_ids]
    held = [e for e in examples if e.id in holdout_ids]
    by_id = {r["id"]: r for r in records}
    identity = {r["id"] for r in records if r.get("source") == "identity"}
    answers = [e for e in train if e.id not in identity]  # identity conversations alone engrave nothing
    if len(answers) < config.min_examples:
        raise ValueError(
            f"only {len(answers)} training examples ({len(records) - len(identity)} records, {len(drops)} dropped, "
            f"{len(held)} held out); at least min_examples={config.min_examples} are needed. Give the previous stage more "
            "prompts (its limit), or lower min_examples.")
    if state.is_main_process:
        with JsonlWriter(stage.path / "data.jsonl", SCHEMAS["sft_example/1"]) as data:
            for e in examples:
                record = by_id[e.id]
                data.write({"id": e.id, "prompt": record["prompt"], "answer": record["answer"],
                            "source": record.get("source", "self_align"), "ended": record.get("ended", True),
                            "split": "holdout" if e.id in holdout_ids else "train", "tokens": len(e.input_ids),
                            "answer_tokens": e.answer_tokens})
            for d in drops:
                record = by_id[d["id"]]
                data.write({"id": d["id"], "prompt": record["prompt"], "answer": record["answer"],
                            "source": record.get("source", "self_align"), "split": "dropped", "reason": d["reason"]})
    summary = train_lora(loaded, train, settings, stage.path, seed=config.seed, data_info=data_info)
    counts = {"records": len(records), "dropped": len(drops), "train": len(train), "holdout": len(held),
              "identity": sum(e.id in identity for e in train),
              "unended": sum(not by_id[e.id].get("ended", True) for e in train), **summary}
    if state.is_main_process:
        losses = [row["loss"] for row in stage.read("loss.jsonl")]
        # Single steps are noisy at a few examples a batch: compare whole epochs.
        per_epoch = max(1, len(losses) // settings.epochs)
        counts.update(first_epoch_loss=round(sum(losses[:per_epoch]) / per_epoch, 4),
                      last_epoch_loss=round(sum(losses[-per_epoch:]) / per_epoch, 4))
        if held:
            adapted = apply_adapter(loaded, stage.path / "adapter")
            try:
                rows = compare_on(adapted, held)
            finally:
                remove_adapter(adapted)
            with JsonlWriter(stage.path / "comparison.jsonl", SCHEMAS["comparison/1"]) as out:
                out.write_all(rows)
            counts.update(holdout_base_logprob=round(sum(r["base_logprob"] for r in rows) / len(rows), 4),
                          holdout_adapted_logprob=round(sum(r["adapted_logprob"] for r in rows) / len(rows), 4),
                          holdout_improved=sum(r["adapted_logprob"] > r["base_logprob"] for r in rows))
    state.wait_for_everyone()
    return counts
