"""LoRA adapters on disk and on a loaded model.

A trained adapter is a plain PEFT adapter directory (`PeftModel.from_pretrained` loads it) with the
tokenizer and `selfalign_adapter.json`, which names the base model, its shape, the data and the
settings. Here: reading that file, applying an adapter (refusing one trained on a model of another
shape), taking it out again, and handing an adapted model to the generation engine. Training
the adapter is `lora.py`'s.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from contextlib import contextmanager
from pathlib import Path

from ..chat_format import ChatFormat
from ..model_files import check_adapter_weights
from ..models import LoadedModel, ModelError
from ..untrusted import json_loads


@contextmanager
def peft_quietly():
    """peft asks transformers `is_gradient_checkpointing`, a name transformers has deprecated:
    nothing for a reader to act on, so the warning stays out of the chapters' output."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        yield

ADAPTER_INFO = "selfalign_adapter.json"


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
    if not path.is_file():
        return {}
    try:
        info = json_loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(info, dict):
        raise ModelError(f"{path}: expected a JSON object, selfalign's record of the adapter")
    # Perhaps edited by hand: what applying the adapter and chatting with it read.
    fields = {field.name for field in dataclasses.fields(ChatFormat)}
    for key, kind, what in (("base_model", str, "the base model's name"), ("base_shape", dict, "an object"),
                            ("chat_format", dict, "an object of ChatFormat's fields")):
        if not isinstance(info.get(key), kind) or key == "chat_format" and not set(info[key]) <= fields:
            if key in info or key != "chat_format":
                raise ModelError(f"{path}: {key!r} must be {what}, found {str(info.get(key))[:80]!r}; "
                                 "retrain the adapter, or restore the file selfalign wrote")
    return info


def apply_adapter(loaded: LoadedModel, adapter_dir: str | Path) -> LoadedModel:
    """The loaded model with a trained adapter applied (a new LoadedModel whose model is a PeftModel).

    Refuses an adapter trained on a model of another shape, with both shapes in the message, rather
    than peft's size-mismatch traceback; warns when only the base model's name differs.
    """
    from peft import PeftModel

    _check_fits(loaded, adapter_dir)
    try:
        with peft_quietly():
            model = PeftModel.from_pretrained(loaded.model, str(adapter_dir))
    except (RuntimeError, ValueError) as error:
        raise ModelError(f"adapter {adapter_dir} does not fit {loaded.name!r}: {error}") from error
    model.eval()
    return LoadedModel(model, loaded.tokenizer, f"{loaded.name}+{Path(adapter_dir).parent.name}", loaded.path,
                       loaded.bos_prefix)


def _check_fits(loaded: LoadedModel, adapter_dir: str | Path) -> None:
    info = adapter_info(adapter_dir)
    check_adapter_weights(adapter_dir)  # peft would fall back to a pickle, and safetensors fail mid-load
    if info:
        expected, found = info["base_shape"], model_shape(loaded.model)
        if expected != found:
            differ = {k: (expected.get(k), found.get(k)) for k in expected if expected.get(k) != found.get(k)}
            raise ModelError(f"adapter {adapter_dir} was trained on {info['base_model']!r}, a model of another "
                             f"shape (adapter's base vs this model: {differ}); load {info['base_model']!r} instead")
        if info["base_model"] != loaded.name:
            warnings.warn(f"adapter {adapter_dir} was trained on {info['base_model']!r}, applying it to "
                          f"{loaded.name!r} (same shape)", stacklevel=3)


def remove_adapter(adapted: LoadedModel) -> None:
    """Take an applied adapter's layers out of the base model again (it is shared with the caller)."""
    _strip_lora(adapted.model)


@contextmanager
def adapted_for_generation(loaded: LoadedModel, adapter_dir: str | Path):
    """The loaded model with an adapter applied, ready for the generation engine; afterwards the
    caller's model is as it was.

    In float32 the adapter is merged into the weights while generating (on a CPU the separate LoRA
    matmuls cost nearly as much as the base ones at 135M) and subtracted again afterwards; in
    16-bit or quantized weights that round trip would leave rounding error in the base model (a
    4-bit layer is dequantized, added to and quantized again), so it stays apart.
    """
    import torch

    adapted = apply_adapter(loaded, adapter_dir)
    merge = all(p.dtype == torch.float32 for p in loaded.model.parameters())  # a 4-bit weight is uint8
    try:
        if merge:
            adapted.model.merge_adapter()
        yield generation_model(adapted)
    finally:
        if merge:
            adapted.model.unmerge_adapter()
        remove_adapter(adapted)


@contextmanager
def adapters_for_generation(loaded: LoadedModel, adapter_dirs: dict[str, str | Path]):
    """The loaded model with several adapters ({name: directory}) applied side by side and not
    merged, so that one batch can mix them: `Engine.generate(..., adapters=)` names each prompt's
    adapter (None: the base model). Afterwards the caller's model is as it was.

    Chapter 4's comparison answers the same prompts with the base model and two adapters: in one
    batch of 6 rows it took 0.5x the time of three batches of 2, each adapter merged, with the same
    answers (benchmarks/RESULTS.md). Not merged, the LoRA products run beside the base ones.
    """
    from peft import PeftModel

    if not adapter_dirs:  # every prompt then runs through the base model
        yield loaded
        return
    model = None
    try:
        for name, directory in adapter_dirs.items():
            _check_fits(loaded, directory)
            try:
                if model is None:
                    with peft_quietly():
                        model = PeftModel.from_pretrained(loaded.model, str(directory), adapter_name=name)
                else:
                    model.load_adapter(str(directory), adapter_name=name)
            except (RuntimeError, ValueError) as error:
                raise ModelError(f"adapter {directory} does not fit {loaded.name!r}: {error}") from error
        model.eval()
        yield generation_model(LoadedModel(model, loaded.tokenizer, loaded.name, loaded.path, loaded.bos_prefix))
    finally:
        if model is not None:
            _strip_lora(model)


def generation_model(adapted: LoadedModel) -> LoadedModel:
    """The same weights, as the plain transformers model the generation engine drives: its forward
    has the cache arguments that PeftModel's wrapper hides. The LoRA layers stay active inside it."""
    from peft import PeftModel

    model = adapted.model.get_base_model() if isinstance(adapted.model, PeftModel) else adapted.model
    return LoadedModel(model, adapted.tokenizer, adapted.name, adapted.path, adapted.bos_prefix)


def _adapter_state(peft_model, full_state=None) -> dict:
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(peft_model, state_dict=full_state)


def _strip_lora(model) -> None:
    from peft import PeftModel

    try:
        from accelerate.utils import extract_model_from_parallel

        model = extract_model_from_parallel(model)
    except ImportError:
        pass
    if isinstance(model, PeftModel):
        model.unload()
