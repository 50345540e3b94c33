"""The chat template and model card saved with each adapter: the template renders what `ChatFormat`
renders, its assistant mask is our loss mask, and transformers' own generate from it answers as
`selfalign generate --adapter` does."""

import json
from dataclasses import replace

import pytest
import torch
import yaml
from jinja2.exceptions import TemplateError

from selfalign.chat_format import ChatFormat
from selfalign.cli import main
from selfalign.models import LoadedModel, load_model
from selfalign.records import provenance
from selfalign.stages import engrave
from selfalign.training import build_examples
from selfalign.training.model_card import template_prefix

CHAT = ChatFormat.load()
ODD = replace(CHAT, assistant='Dr. "Ö\\mé" {%x%} {{y}} 🐪', developer="a {lab}'s \"team\"\n")
# End marker not the next user turn's opening, a turn with text after the answer, no overview.
OTHER = ChatFormat(assistant="Bot", developer="us", overview="", conversation_heading="Chat:",
                   user_turn="<u>{text}</u>", assistant_turn="<{assistant}>{text}", end_of_answer="<|end|>")
SUFFIXED = replace(OTHER, assistant_turn="<{assistant}>{text}</{assistant}>", overview="{assistant} by {developer}.")
FORMATS = {"default": CHAT, "odd names": ODD, "other markers": OTHER, "text after the answer": SUFFIXED}
HISTORIES = {"single turn": (), "one earlier turn": (("First?", " One. "),),
             "two earlier turns": (("  {{ 7 * 7 }} {% if %}", "Forty-nine\n\n"), ("Ünïcode 🐪 ?", "Yes."))}


def conversation(history, user=None, answer=None, system=None):
    messages = [{"role": "system", "content": system}] if system is not None else []
    for question, reply in history:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
    if user is not None:
        messages.append({"role": "user", "content": user})
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def render(tiny, chat, messages, **options):
    return tiny.tokenizer.apply_chat_template(messages, chat_template=chat.chat_template(options.pop("instruction", "")),
                                              tokenize=False, **options)


@pytest.mark.parametrize("history", HISTORIES.values(), ids=HISTORIES)
@pytest.mark.parametrize("chat", FORMATS.values(), ids=FORMATS)
def test_template_renders_what_chat_format_renders(tiny, chat, history):
    user = " What now?\n"
    expected = chat.prompt(user, history)
    assert render(tiny, chat, conversation(history, user), add_generation_prompt=True) == expected
    # A conversation that ends with an answer is a training example: the prompt, then the target.
    assert render(tiny, chat, conversation(history, user, " Done. ")) == expected + chat.target(" Done. ")
    # A system message is the extra instruction, where stage 4's teacher had its own.
    taught = chat.prompt(user, history, instruction="Be thorough.")
    assert render(tiny, chat, conversation(history, user, system=" Be thorough. "), add_generation_prompt=True) == taught
    assert render(tiny, chat, conversation(history, user), add_generation_prompt=True,
                  instruction="Be thorough.") == taught


def test_template_refuses_conversations_the_format_cannot_hold(tiny):
    with pytest.raises(TemplateError, match="must alternate user, assistant.*message 1 is user"):
        render(tiny, CHAT, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(TemplateError, match="message 0 is assistant"):
        render(tiny, CHAT, [{"role": "assistant", "content": "a"}])
    with pytest.raises(TemplateError, match="ends with a user message"):
        render(tiny, CHAT, conversation((), "Hi", "Hello"), add_generation_prompt=True)
    with pytest.raises(TemplateError, match="content must be text"):
        render(tiny, CHAT, [{"role": "user", "content": [{"type": "text", "text": "a"}]}])


@pytest.mark.parametrize("chat", [CHAT, ODD, OTHER], ids=["default", "odd names", "other markers"])
@pytest.mark.parametrize("bos", ["", "<s>"], ids=["no bos", "bos prefix"])
def test_assistant_mask_is_the_training_loss_mask(tiny, chat, bos):
    loaded = LoadedModel(tiny.model, tiny.tokenizer, "tiny-random", None, bos_prefix=bos)
    records = [{"id": "a", "prompt": "What is 2 plus 2?", "answer": "It is 4."},
               {"id": "b", "prompt": f"Who is {chat.assistant}?", "answer": f"I am {chat.assistant}. 🐪"}]
    examples, drops = build_examples(records, loaded, chat, 4096)
    assert not drops
    template = chat.chat_template(prefix=template_prefix(loaded))
    for record, example in zip(records, examples):
        out = tiny.tokenizer.apply_chat_template(conversation((), record["prompt"], record["answer"]),
                                                 chat_template=template, tokenize=True, return_dict=True,
                                                 return_assistant_tokens_mask=True)
        assert out["input_ids"] == example.input_ids
        assert out["assistant_masks"] == [int(label != -100) for label in example.labels]
        prompt = tiny.tokenizer.apply_chat_template(conversation((), record["prompt"]), chat_template=template,
                                                    tokenize=True, add_generation_prompt=True, return_dict=True)
        assert prompt["input_ids"] == tiny.tokenizer(bos + chat.prompt(record["prompt"]))["input_ids"]


def test_every_answer_of_a_longer_conversation_is_masked_with_its_end_marker(tiny):
    out = tiny.tokenizer.apply_chat_template(conversation((("Hi", "Hello."), ("And?", "Then.")), "Bye", "Bye!"),
                                             chat_template=CHAT.chat_template(), tokenize=True, return_dict=True,
                                             return_assistant_tokens_mask=True)
    masked = tiny.tokenizer.decode([t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m])
    assert masked == "Hello.\n\n### UserThen.\n\n### UserBye!\n\n### User"


@pytest.fixture(scope="module")
def adapter(tiny, tmp_path_factory):
    """A stage-3 adapter of the tiny model, trained on stage-2 records that carry a principle hash."""
    runs = tmp_path_factory.mktemp("runs")
    responses = runs / "responses.jsonl"
    origin = provenance("tiny-random", {}, 0, "0123abcd0123abcd")
    rows = [{"id": f"r{i}", "prompt": f"What is {i} plus {i}?", "answer": f"It is {2 * i}. Simple.",
             "provenance": origin} for i in range(6)]
    responses.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = tiny.tokenizer.chat_template
    manifest = engrave.run(engrave.EngraveConfig(run="r", runs_dir=str(runs), model="tiny-random", epochs=3,
                                                 learning_rate=2e-2, responses=str(responses)), loaded=tiny)
    assert tiny.tokenizer.chat_template == before  # the caller's tokenizer keeps its own template
    return runs / "r" / "engrave" / "adapter", manifest["counts"]


def test_adapter_dir_has_the_template_and_a_peft_model_card(adapter):
    from transformers import AutoTokenizer

    directory, counts = adapter
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert tokenizer.chat_template == CHAT.chat_template()
    assert tokenizer.apply_chat_template([{"role": "user", "content": "Hi?"}], tokenize=False,
                                         add_generation_prompt=True) == CHAT.prompt("Hi?")
    card = (directory / "README.md").read_text()
    _, header, body = card.split("---\n", 2)
    meta = yaml.safe_load(header)
    assert meta["base_model"] == "tiny-random" and meta["library_name"] == "peft"
    assert {"selfalign", "lora", "engrave"} <= set(meta["tags"])
    assert "`0123abcd0123abcd`" in body  # stage 2's principle set, from its records' provenance
    assert f"| examples trained | {counts['train']} ({counts['identity']} of them identity" in body
    assert f"| held out | {counts['holdout']} |" in body and "PeftModel.from_pretrained" in body
    info = json.loads((directory / "selfalign_adapter.json").read_text())
    assert info["principles_hash"] == "0123abcd0123abcd" and info["holdout_examples"] == counts["holdout"]


def test_the_card_names_a_registered_models_hub_id(tmp_path):
    from selfalign.training.model_card import write_model_card

    info = {"base_model": "smollm2-135m-instruct", "base_path": "/cache/x", "examples": 3, "stage": "verbose",
            "chat_format": CHAT.to_dict()}
    meta = yaml.safe_load(write_model_card(tmp_path, info).read_text().split("---\n", 2)[1])
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and "verbose" in meta["tags"]


def test_transformers_generate_from_the_template_equals_selfalign_generate(adapter, capsys):
    from peft import PeftModel
    from transformers import AutoTokenizer

    directory, _ = adapter
    question, new_tokens = "What is 3 plus 3?", 24
    assert main(["generate", question, "--model", "tiny-random", "--adapter", str(directory), "--chat",
                 "--temperature", "0", "--max-new-tokens", str(new_tokens), "--json"]) == 0
    ours = json.loads(capsys.readouterr().out.splitlines()[-1])

    tokenizer = AutoTokenizer.from_pretrained(directory)
    base = load_model("tiny-random").model  # the same seeded weights the CLI loads
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           return_dict=True, return_tensors="pt")
    assert ours["prompt_tokens"] == inputs["input_ids"].shape[1]
    with torch.no_grad():
        plain = base.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
        model = PeftModel.from_pretrained(base, str(directory)).eval()
        output = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, stop_strings=[CHAT.stop],
                                tokenizer=tokenizer)
    generated = output[0, inputs["input_ids"].shape[1]:]
    assert ours["text"] == tokenizer.decode(generated, skip_special_tokens=True).split(CHAT.stop)[0]
    assert ours["completion_tokens"] == len(generated)
    assert not torch.equal(plain[0, :len(output[0])], output[0])  # the adapter is what answered
