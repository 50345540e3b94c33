"""Training checkpoints: every `checkpoint_every` optimizer steps the adapter weights, optimizer,
scheduler and random states are saved under `<out_dir>/checkpoints/step-<n>/`, and a killed run
resumes from the last complete one (with the same batches, since those are fixed by the seed).

Selfalign's own checkpoints are safetensors and JSON, which load without running code; accelerate's
format (FSDP's, older runs') holds torch pickles and is refused unless allow_pickle. The loop
that calls these is `lora.py`.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

from ..untrusted import json_loads, one_line
from .adapters import _adapter_state


class CheckpointError(ValueError):
    """A training checkpoint that cannot be resumed from; the message names it and what to do."""


CHECKPOINT_FORMAT = "safetensors+json"  # complete.json's "format"; anything else is accelerate's pickles


def _complete_checkpoints(checkpoints: Path) -> list[tuple[int, Path]]:
    found = []
    for marker in checkpoints.glob("step-*/complete.json"):
        try:
            step = json_loads(marker.read_text())["step"]
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
    """`_write_checkpoint`, whose failure to write (a full disk) is one line naming the checkpoint:
    safetensors reports one as its own error class, naming no file."""
    from safetensors import SafetensorError

    try:
        _write_checkpoint(accelerator, checkpoints, step, keep, model, optimizer, scheduler)
    except (OSError, SafetensorError) as error:
        where = getattr(error, "filename", None) or checkpoints / f"step-{step}"
        raise CheckpointError(f"{where}: cannot save the checkpoint ({one_line(error)})") from None


def _write_checkpoint(accelerator, checkpoints: Path, step: int, keep: int, model, optimizer, scheduler) -> None:
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
        from ..records import write_json_atomic

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
    return json_loads(path.read_text())
