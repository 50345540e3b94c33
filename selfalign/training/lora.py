"""The LoRA training loop.

Training runs peft LoRA through accelerate, so one loop serves the CPU, one GPU, and several
processes under `accelerate launch` (DDP or FSDP, by accelerate config). The batches of every
epoch are fixed by the seed before training starts (`settings.batch_schedule`), checkpoints are
written and resumed by `checkpoints.py`, and the result is an adapter directory (`adapters.py`)
with its chat template and model card (`model_card.py`).
Building the examples and comparing the result with the base model are not done here.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

from ..chat_format import ChatFormat
from ..models import LoadedModel
from ..records import adapter_path
from ..untrusted import one_line
from .adapters import ADAPTER_INFO, _adapter_state, _strip_lora, model_shape, peft_quietly
from .checkpoints import CheckpointError, _resume, _save_checkpoint
from .examples import Example, _collate
from .model_card import save_tokenizer, template_prefix, write_model_card
from .settings import TrainSettings, _no_gpu, batch_schedule


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

    from ..links import refuse_links
    from ..records import SCHEMAS, JsonlWriter

    settings.check()
    if not examples:
        raise ValueError("no training examples")
    out_dir = Path(out_dir)
    # A linked checkpoints/ would resume from elsewhere, and pruning would delete folders there.
    refuse_links(out_dir / "checkpoints", start=out_dir, walk=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(mixed_precision=_mixed_precision(settings.mixed_precision), cpu=_no_gpu())
    main = accelerator.is_main_process
    set_seed(seed)

    base = loaded.model
    _check_targets(base, settings.target_modules)
    _check_not_repacked(base)
    # What the model is decides, not settings.quantize: a float base given QLoRA's preparation
    # would only have its bf16 weights cast to float32.
    if getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False):
        from peft import prepare_model_for_kbit_training

        # Non-reentrant checkpointing (torch's advice) needs no hook making the inputs require grad.
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=settings.gradient_checkpointing,
                                               gradient_checkpointing_kwargs={"use_reentrant": False})
    elif settings.gradient_checkpointing:
        base.gradient_checkpointing_enable()
        base.enable_input_require_grads()
    lora = LoraConfig(r=settings.rank, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                      target_modules=list(settings.target_modules), task_type="CAUSAL_LM")
    with peft_quietly():
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

        adapter_dir = adapter_path(out_dir)
        # Under FSDP gathering the full state is collective: every process takes part.
        state = accelerator.get_state_dict(model) if accelerator.distributed_type == "FSDP" else None
        if main:
            _save_adapter(accelerator.unwrap_model(model), adapter_dir, state)
            info = {"base_model": loaded.name, "base_path": loaded.path, "base_shape": model_shape(loaded.model),
                    "bos_prefix": loaded.bos_prefix, "settings": json.loads(json.dumps(asdict(settings))),
                    "seed": seed, "examples": len(examples), "steps": len(schedule),
                    "processes": accelerator.num_processes, **(data_info or {})}
            # The tokenizer carries the format as a chat template and README.md (replacing PEFT's
            # generic card) says where the adapter came from, so that other tools need no selfalign.
            chat = ChatFormat(**info["chat_format"]) if info.get("chat_format") else None
            save_tokenizer(loaded.tokenizer, adapter_dir, chat.chat_template(prefix=template_prefix(loaded)) if chat
                           else None)
            (adapter_dir / ADAPTER_INFO).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
            write_model_card(adapter_dir, info)
        accelerator.wait_for_everyone()
        return {"steps": len(schedule), "resumed_from": done, "examples": len(examples),
                "processes": accelerator.num_processes}
    finally:
        # Give the caller its model back without LoRA layers (the adapter is on disk).
        accelerator.free_memory()
        _strip_lora(model)
        if settings.gradient_checkpointing and getattr(loaded.model, "gradient_checkpointing_disable", None):
            loaded.model.gradient_checkpointing_disable()
            loaded.model.disable_input_require_grads()  # the hook that checkpointing needed
        loaded.model.eval()


def _save_adapter(unwrapped, adapter_dir: Path, state) -> None:
    """peft's save_pretrained, whose failure to write (a full disk) is one line naming the adapter."""
    from safetensors import SafetensorError

    try:
        unwrapped.save_pretrained(adapter_dir, state_dict=_adapter_state(unwrapped, state))
    except (OSError, SafetensorError) as error:
        raise CheckpointError(f"{getattr(error, 'filename', None) or adapter_dir}: cannot save the adapter "
                              f"({one_line(error)})") from None


def _mixed_precision(choice: str) -> str:
    import torch

    if choice != "auto":
        return choice
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def _check_not_repacked(model) -> None:
    # bitsandbytes repacks 4-bit weights for its CPU inference kernel (models._load_directory says
    # when), and a repacked layer passes no gradient back: training would move nothing.
    repacked = [name for name, module in model.named_modules()
                if getattr(getattr(module, "weight", None), "quant_state", None) is not None
                and getattr(module.weight.quant_state, "packing_format_for_cpu", False)]
    if repacked:
        raise ValueError(f"{len(repacked)} 4-bit layers ({repacked[0]}, ...) were repacked by bitsandbytes for CPU "
                         "inference and would pass no gradient back; load the model with selfalign.models."
                         "load_model(..., quantize='4bit'), which keeps them trainable")


def _check_targets(model, targets) -> None:
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ == "Linear"})
        raise ValueError(f"target_modules {missing} are not in this model; its linear layers are {linear}")
