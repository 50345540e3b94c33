"""Stage 3 on a 4-bit base (QLoRA: bitsandbytes NF4) on the CPU, with the tiny random model saved to
a directory, whose linear layers bitsandbytes quantizes like any Llama's (14 Linear4bit layers)."""

import importlib.util
import json
import math

import pytest
import torch

from selfalign.chat_format import ChatFormat
from selfalign.models import ModelError, load_model, tiny_random_model
from selfalign.stages import engrave
from selfalign.training import TrainSettings, adapted_for_generation, answer_logprobs, build_examples, train_lora
from test_train import write_responses

needs_bitsandbytes = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                                        reason="bitsandbytes is not installed (the dev extra has it: "
                                               "pip install -e '.[dev]', or pip install bitsandbytes)")
CHAT = ChatFormat.load()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    model, tokenizer = tiny_random_model()
    path = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_tiny_random_cannot_be_quantized():
    with pytest.raises(ModelError, match="built in memory"):
        load_model("tiny-random", quantize="4bit")


@needs_bitsandbytes
@pytest.mark.slow  # a few seconds, most of it importing bitsandbytes
def test_engraving_a_4bit_base_on_the_cpu(tmp_path, tiny_dir):
    from bitsandbytes.nn import Linear4bit
    from peft import PeftModel
    from safetensors.torch import load_file

    write_responses(tmp_path / "responses.jsonl", n=12)
    config = engrave.EngraveConfig(run="q", runs_dir=str(tmp_path), model=str(tiny_dir), quantize="4bit",
                                   responses=str(tmp_path / "responses.jsonl"), identity="", epochs=4,
                                   learning_rate=3e-2, warmup_steps=0)
    manifest = engrave.run(config)  # the stage loads the model itself, as `selfalign stage engrave` does
    counts = manifest["counts"]
    assert manifest["status"] == "finished" and counts["train"] == 10 and counts["holdout"] == 2
    stage = tmp_path / "q" / "engrave"
    # The adapter moved: LoRA's B matrices start at zero.
    weights = load_file(str(stage / "adapter" / "adapter_model.safetensors"))
    assert all(float(w.abs().max()) > 0 for name, w in weights.items() if "lora_B" in name)
    info = json.loads((stage / "adapter" / "selfalign_adapter.json").read_text())
    assert info["settings"]["quantize"] == "4bit"

    # It loads back with plain peft onto a 4-bit base, and generates.
    base = load_model(str(tiny_dir), quantize="4bit")
    assert sum(isinstance(m, Linear4bit) for m in base.model.modules()) == 14
    tuned = PeftModel.from_pretrained(base.model, str(stage / "adapter"))
    ids = base.tokenizer(CHAT.prompt("What is 3 plus 3?"), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = tuned.generate(input_ids=ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        assert out.shape[1] == ids.shape[1] + 8 and base.tokenizer.decode(out[0, ids.shape[1]:])
        with tuned.disable_adapter():
            plain = tuned(input_ids=ids).logits
        assert not torch.allclose(tuned(input_ids=ids).logits, plain, atol=1e-4)

    # The held-out answers were scored under the 4-bit base (the same numbers as here, not the
    # float32 base's), and are finite under both models.
    rows = [json.loads(line) for line in (stage / "comparison.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(r["base_logprob"]) and math.isfinite(r["adapted_logprob"])
                                  for r in rows)
    held = [r for r in map(json.loads, (stage / "data.jsonl").read_text().splitlines()) if r["split"] == "holdout"]
    tuned.unload()
    examples, _ = build_examples(held, base, CHAT, 512)
    assert answer_logprobs(base.model, examples) == pytest.approx([r["base_logprob"] for r in rows], abs=1e-9)
    float32 = load_model(str(tiny_dir))
    assert answer_logprobs(float32.model, examples) != pytest.approx([r["base_logprob"] for r in rows], abs=1e-4)

    # A float32 model handed in (as the notebooks and `selfalign run` do) is not what quantize asks
    # for: the stage loads the 4-bit one, and trains the same adapter.
    again = engrave.run(engrave.EngraveConfig(**{**config.__dict__, "run": "q2"}), loaded=float32)
    assert again["counts"]["holdout_base_logprob"] == counts["holdout_base_logprob"]
    second = load_file(str(tmp_path / "q2" / "engrave" / "adapter" / "adapter_model.safetensors"))
    for name, tensor in weights.items():
        torch.testing.assert_close(second[name], tensor, rtol=0, atol=1e-6)


@needs_bitsandbytes
@pytest.mark.slow
def test_a_4bit_base_that_has_scored_and_generated_still_trains(tmp_path, tiny_dir):
    """bitsandbytes repacks a 4-bit layer for its CPU inference kernel the first time it runs without
    gradients, and a repacked layer passes no gradient back (0.50.2, on CPUs with AVX512-BF16): the
    loader keeps the layers unpacked. And generating with an adapter leaves the 4-bit base as it was
    (merging into 4-bit weights would quantize them again)."""
    loaded = load_model(str(tiny_dir), quantize="4bit")
    records = [{"id": f"x{i}", "prompt": f"Question {i % 3}", "answer": "The answer is always forty-two."}
               for i in range(8)]
    examples, _ = build_examples(records, loaded, CHAT, 256)
    before = answer_logprobs(loaded.model, examples)  # a pass without gradients first
    settings = TrainSettings(epochs=6, learning_rate=3e-2, warmup_steps=0, quantize="4bit")
    train_lora(loaded, examples, settings, tmp_path / "first", progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "first" / "loss.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0] - 0.2, losses

    ids = torch.tensor([examples[0].input_ids])
    with torch.no_grad():
        logits = loaded.model(ids).logits
        with adapted_for_generation(loaded, tmp_path / "first" / "adapter") as adapted:
            assert not torch.allclose(adapted.model(ids).logits, logits, atol=1e-4)
        torch.testing.assert_close(loaded.model(ids).logits, logits, rtol=0, atol=0)
    assert answer_logprobs(loaded.model, examples) == before
    # ...and after all that inference it trains again, to the same adapter.
    train_lora(loaded, examples, settings, tmp_path / "second", progress=False)
    again = [json.loads(line)["loss"] for line in (tmp_path / "second" / "loss.jsonl").read_text().splitlines()]
    assert again == pytest.approx(losses, abs=1e-5)
