"""What a LoRA run is told and where it runs: `TrainSettings` (checked, and read from a stage
config), the seeded batches of every optimizer step, which process this is under
`accelerate launch`, and loading the base model onto that process's device.

The loop that uses them is `lora.py`; nothing here imports torch at module level.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from ..config import range_problems
from ..models import LoadedModel


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
    quantize: str = ""  # "": as loaded; "4bit": QLoRA, an NF4 base (bitsandbytes; on a GPU or the CPU)
    device_map: str = ""  # "": one device per process; "auto": spread one process's model over all GPUs
    allow_pickle: bool = False  # resume from a checkpoint of torch pickles (FSDP's, older ones): they can run code

    def check(self) -> None:
        """ValueError, one line, naming every setting out of range (`config.range_problems`, and
        the bounds of these settings alone). The stages that train call it when their config is built."""
        problems = range_problems(self, non_negative=("warmup_steps", "total_batch_size", "weight_decay"),
                                  positive=("rank", "lora_alpha", "epochs", "micro_batch_size", "grad_accum",
                                            "checkpoint_every", "keep_checkpoints", "max_grad_norm"),
                                  non_empty=("target_modules",))

        def finite(value) -> bool:  # else range_problems named it
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        if finite(self.lora_dropout) and not 0 <= self.lora_dropout < 1:
            problems.append(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if finite(self.learning_rate) and not 0 < self.learning_rate <= 0.1:
            problems.append(f"learning_rate {self.learning_rate} makes no sense for LoRA (use e.g. 1e-4 to 1e-3)")
        if finite(self.cutoff) and self.cutoff < 16:
            problems.append(f"cutoff must be at least 16 tokens, got {self.cutoff}")
        if self.overlong not in ("drop", "truncate"):
            problems.append(f"overlong must be 'drop' or 'truncate', got {self.overlong!r}")
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


def load_for_training(name: str, settings: TrainSettings, loaded: LoadedModel | None = None) -> LoadedModel:
    """Load the base model where this process will train it.

    Under `accelerate launch` with several processes the model is loaded on the CPU and accelerate
    moves it to each process's GPU (DDP) or shards it (FSDP); loading it straight to "cuda" would
    put every process's copy on GPU 0. A 4-bit model must be loaded onto its process's GPU.
    A model handed in (`loaded`: a notebook's, or the one `selfalign run` shares between stages) is
    used, unless settings.quantize asks for a quantized base that it is not: then this loads one.
    """
    from ..models import load_model

    if loaded is not None and (not settings.quantize
                               or getattr(loaded.model, f"is_loaded_in_{settings.quantize}", False)):
        return loaded
    state = process_state()
    device_map = settings.device_map or None
    if settings.quantize and device_map is None and state.device.type == "cuda":
        device_map = {"": state.device.index or 0}
    elif device_map is None and state.num_processes > 1:
        device_map = {"": "cpu"}
    return load_model(name, quantize=settings.quantize or None, device_map=device_map)


def process_state():
    """Which process this is under `accelerate launch` (one process otherwise).

    Without a GPU, accelerate counts launched processes only when told it is on the CPU; it then
    joins them with gloo. `accelerate launch --multi_gpu --num_processes 2` on a CPU machine relies
    on this (the `--cpu` flag would start a single process).
    """
    from accelerate import PartialState

    return PartialState(cpu=_no_gpu())


def _no_gpu() -> bool:
    import torch

    return not torch.cuda.is_available()
