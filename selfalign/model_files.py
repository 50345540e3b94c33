"""Checks of a model or adapter folder's files before anything loads them, each refusing a bad
file with one line that names it (`ModelError`).

- `check_config`: config.json is a JSON object with a `model_type`, and where transformers knows
  that architecture, its own config class accepts every value (a wrong type there is otherwise a
  fifty-line validation traceback, raised from inside the tokenizer's loading);
- `check_safetensors`: a weights file's header parses and describes exactly the bytes the file
  has, so a file cut short (a copy that ran out of space) is named before a stage starts, not
  found by safetensors mid-load;
- `check_adapter_weights`: an adapter folder holds `adapter_model.safetensors`; a pickled
  `adapter_model.bin` is refused here, by us, since loading a pickle can run code.

Reading a header costs a few kilobytes per file, whatever the model's size. This module loads no
weights, and runs no code a model folder ships (`auto_map` configs are left to transformers'
`trust_remote_code`).
"""

from __future__ import annotations

import json
from pathlib import Path

from .untrusted import json_loads, one_line

HEADER_LIMIT = 100_000_000  # bytes; safetensors itself refuses a header over 100 MB


class ModelError(RuntimeError):
    """A model name, path or option that cannot be loaded; the message says what to do."""


def check_config(path: Path) -> None:
    # transformers reports a broken config.json with a traceback that does not always name it.
    try:
        config = json_loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelError(f"{path}: not a valid config.json ({error})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ModelError(f"{path}: expected a JSON object with a 'model_type' (e.g. \"llama\"), the architecture "
                         "to build")
    from transformers import CONFIG_MAPPING

    if config["model_type"] not in CONFIG_MAPPING:
        return  # an architecture transformers does not ship: only its own code could check it
    try:
        CONFIG_MAPPING[config["model_type"]].from_dict(config)
    except Exception as error:  # transformers validates by TypeError, ValueError and its own classes alike
        raise ModelError(f"{path}: transformers' {config['model_type']} config refuses it ({one_line(error)})") \
            from None


def check_safetensors(path: Path) -> None:
    """The file's header is a JSON object whose tensors end exactly where the file does."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        start = handle.read(8)
        length = int.from_bytes(start, "little") if len(start) == 8 else -1
        if not 0 < length <= min(size - 8, HEADER_LIMIT):
            raise ModelError(f"{path}: not a whole safetensors file (its header is cut short or missing; the file "
                             f"has {size} bytes): copy it again")
        raw = handle.read(length)
    try:
        header = json_loads(raw.decode("utf-8"))
        ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
        if not all(isinstance(end, int) for end in ends):
            raise TypeError
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, IndexError, TypeError):
        raise ModelError(f"{path}: not a safetensors file (its header does not describe tensors)") from None
    expected = 8 + length + max(ends, default=0)
    if expected != size:
        raise ModelError(f"{path}: cut short or damaged (its header describes {expected} bytes, the file has "
                         f"{size}): copy it again")


def check_weights(folder: Path) -> None:
    """Every safetensors file of a model folder (all the shards of a large one)."""
    for path in sorted(folder.glob("*.safetensors")):
        check_safetensors(path)


def check_adapter_weights(folder: str | Path) -> None:
    """An adapter folder's weights: adapter_model.safetensors, whole; never a pickle."""
    folder = Path(folder)
    weights = folder / "adapter_model.safetensors"
    if weights.is_file():
        check_safetensors(weights)
        return
    pickled = [folder / name for name in ("adapter_model.bin", "adapter_model.pt") if (folder / name).exists()]
    if pickled:
        raise ModelError(f"{pickled[0]}: a pickled adapter, which can run code when loaded; selfalign loads "
                         "adapter_model.safetensors only (convert it where you trust it)")
    raise ModelError(f"{weights} does not exist: {folder} holds no adapter weights")
