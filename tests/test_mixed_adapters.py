"""Several LoRA adapters in one batch: each row through its own adapter, as if decoded alone."""

import pytest

from selfalign.generation import Engine, SamplingParams
from selfalign.models import tiny_random_model
from selfalign.training import adapted_for_generation, adapters_for_generation

PROMPTS = ["User: hello there", "User: what is the capital of France? Assistant:", "x", "User: name three rivers"]
PARAMS = SamplingParams(temperature=0, max_new_tokens=10)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """The tiny model's directory and two adapters on it, with random A and B (peft's default B is
    zero, which would change nothing)."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("mixed")
    model, tokenizer = tiny_random_model()
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    for seed, name in enumerate(("first", "second")):
        import torch

        torch.manual_seed(seed)
        lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                          task_type="CAUSAL_LM")
        get_peft_model(tiny_random_model()[0], lora).save_pretrained(root / name)
    return root


def test_a_mixed_batch_answers_as_each_adapter_alone(adapters):
    from selfalign.models import load_model

    loaded = load_model(str(adapters / "model"))
    base = Engine.for_model(loaded, progress=False).generate(PROMPTS, PARAMS)
    alone = {}
    for name in ("first", "second"):
        with adapted_for_generation(loaded, adapters / name) as adapted:  # merged, as the stages generate
            alone[name] = Engine.for_model(adapted, progress=False).generate(PROMPTS, PARAMS)
    assert alone["first"] != base and alone["second"] != alone["first"]  # so that the test below can fail

    names = [None, "first", "second"]
    rows = [(name, i) for name in names for i in range(len(PROMPTS))]
    with adapters_for_generation(loaded, {name: adapters / name for name in ("first", "second")}) as model:
        # Batches of 5 split the rows across batches and mix the adapters within them.
        mixed = Engine.for_model(model, batch_size=5, progress=False).generate(
            [PROMPTS[i] for _, i in rows], PARAMS, keys=[f"{name}/{i}" for name, i in rows],
            adapters=[name for name, _ in rows])
    got = {name: [c.text for c, (n, _) in zip(mixed, rows) if n == name] for name in names}
    assert got[None] == [c.text for c in base]
    assert got["first"] == [c.text for c in alone["first"]]
    assert got["second"] == [c.text for c in alone["second"]]
    # The caller's model is as it was: no LoRA layers left behind.
    assert Engine.for_model(loaded, progress=False).generate(PROMPTS, PARAMS) == base
    assert not any("lora" in name for name, _ in loaded.model.named_modules())


def test_adapters_are_refused_where_they_cannot_be_mixed(adapters):
    from selfalign.models import load_model

    loaded = load_model(str(adapters / "model"))
    with pytest.raises(ValueError, match="cannot mix adapters"):
        Engine.for_model(loaded, backend="hf-static", progress=False).generate(PROMPTS[:1], PARAMS, adapters=["first"])
    with pytest.raises(ValueError, match="one per prompt"):
        Engine.for_model(loaded, progress=False).generate(PROMPTS[:2], PARAMS, adapters=["first"])
    with adapters_for_generation(loaded, {"first": adapters / "first"}) as model:
        with pytest.raises(ValueError, match=r"\['third'\] are not on the model"):
            Engine.for_model(model, progress=False).generate(PROMPTS[:1], PARAMS, adapters=["third"])
        with pytest.raises(ValueError, match="shared prefix"):
            Engine.for_model(model, progress=False).generate(PROMPTS[:2], PARAMS, shared_prefix="User: ",
                                                             adapters=[None, "first"])
    with pytest.raises(ValueError, match="holds none"):
        Engine.for_model(loaded, progress=False).generate(PROMPTS[:1], PARAMS, adapters=["first"])


def test_side_by_side_puts_each_models_answers_in_its_column(adapters):
    from selfalign.models import load_model
    from selfalign.stages.engrave import side_by_side

    loaded = load_model(str(adapters / "model"))
    prompts = ["hello there", "name three rivers"]
    table = side_by_side(loaded, prompts, {"first (x.y)": adapters / "first"}, max_new_tokens=8)
    assert side_by_side(loaded, prompts, {}, max_new_tokens=8)["base"].tolist() == table["base"].tolist()
    assert list(table.columns) == ["prompt", "base", "first (x.y)"]
    from selfalign.chat_format import ChatFormat

    chat = ChatFormat.load()
    params = SamplingParams(temperature=0, max_new_tokens=8, stop=(chat.stop,))
    texts = [chat.prompt(p) for p in prompts]
    assert table["base"].tolist() == [c.text.strip() for c in Engine.for_model(loaded, progress=False).generate(texts, params)]
    with adapted_for_generation(loaded, adapters / "first") as adapted:
        expected = [c.text.strip() for c in Engine.for_model(adapted, progress=False).generate(texts, params)]
    assert table["first (x.y)"].tolist() == expected
