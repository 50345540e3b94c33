"""The contract every generation backend keeps, run over each one on CPU.

Backends: a scripted fake (pure Python), "hf" (transformers generate), "hf-static" (the static-cache
decoder, eager here) and "vllm": the real vLLM where it is importable (vLLM's CPU build in the venv
that `make vllm` builds: `make test-vllm`), else the stand-in module in tests/vllm_standin/.
Contract: stop strings cut the text and are reported; finish reasons and token counts agree with
each other; a prompt's sample depends on its seed and key, not on its batch; records have one shape.
"""

from __future__ import annotations

import importlib
import importlib.util
import random
import sys
from pathlib import Path

import pytest

from selfalign.generation import (FINISH_REASONS, Completion, Engine, HFBackend, SamplingParams, cut_at_stop,
                                  engine_for)
from selfalign.records import SCHEMAS
from selfalign.stages.common import generation_record

STANDIN = Path(__file__).parent / "vllm_standin"
PROMPTS = ["User: hello there", "User: what is the capital of France? Assistant:", "x",
           "The quick brown fox jumps over the lazy dog", "I should follow rules 1 and 2"]
REAL_VLLM = importlib.util.find_spec("vllm") is not None


class FakeBackend:
    """Words as tokens; each next word drawn from the row's seed and the text so far. "<eos>" ends."""

    name = "fake"
    words = ["alpha", "beta", "gamma", "delta", "the", "end.", "\n", "<eos>"]

    def count_tokens(self, texts, shared_prefix=None):
        return [len(t.split()) for t in texts]

    def stream_batch(self, prompts, params, seeds, shared_prefix=None, max_prompt_tokens=None):
        out = []
        for prompt, seed in zip(prompts, seeds):
            rng = random.Random(seed if params.temperature > 0 else prompt)
            tokens = []
            for _ in range(params.max_new_tokens):
                tokens.append(rng.choice(self.words))
                if tokens[-1] == "<eos>":
                    break
            count = len(prompt.split())
            for used in range(1, len(tokens) + 1):
                text, stop = cut_at_stop(" ".join(t for t in tokens[:used] if t != "<eos>"), params.stop)
                if stop is not None:
                    out.append(Completion(text, "stop", count, used, stop))
                    break
            else:
                text = " ".join(t for t in tokens if t != "<eos>")
                reason = "eos" if tokens and tokens[-1] == "<eos>" else "length"
                out.append(Completion(text, reason, count, len(tokens)))
        return out


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from selfalign.models import tiny_random_model

    # Heads of 32 dimensions (128 / 4), not tiny-random's 16: vLLM's CPU attention has kernels for
    # 32 and up, and refuses 16 ("Unsupported CPU attention configuration: head_dim=16").
    model, tokenizer = tiny_random_model(hidden_size=128)
    path = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def vllm_module():
    """The real vllm where installed, otherwise the stand-in, removed again afterwards."""
    if REAL_VLLM:
        yield importlib.import_module("vllm")
        return
    sys.path.insert(0, str(STANDIN))
    try:
        yield importlib.import_module("vllm")
    finally:
        sys.path.remove(str(STANDIN))
        for name in [n for n in sys.modules if n == "vllm" or n.startswith("vllm.")]:
            del sys.modules[name]


@pytest.fixture(scope="module")
def vllm_backend(vllm_module, tiny_dir):
    """One vLLM engine on the tiny model for this module's tests: a real one takes half a minute to
    start (its engine and worker processes), and the stage test starts its own through engine_for."""
    from selfalign.generation.vllm import VLLMBackend

    return VLLMBackend(str(tiny_dir))


class Settings:
    def __init__(self, backend, model, batch_size=8):
        self.backend, self.model, self.batch_size = backend, model, batch_size


@pytest.fixture(params=["fake", "hf", "hf-static", "vllm"])
def make_engine(request, tiny):
    """A function batch_size -> Engine on one backend; the model backends run tiny-random (vLLM with
    wider heads: tiny_dir)."""
    kind = request.param
    if kind == "fake":
        return lambda batch_size: Engine(FakeBackend(), batch_size=batch_size, progress=False)
    if kind in ("hf", "hf-static"):
        return lambda batch_size: Engine.for_model(tiny, backend=kind, batch_size=batch_size, progress=False)
    backend = request.getfixturevalue("vllm_backend")
    return lambda batch_size: Engine(backend, batch_size=batch_size, context_length=backend.context_length,
                                     progress=False)


def test_stop_strings_cut_the_text_and_are_reported(make_engine):
    free = make_engine(3).generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=24))
    text = next(c.text for c in free if len(c.text) > 6)
    stop = text[3:5]  # a stop string that occurs, somewhere in the middle of a token or between two
    cut = make_engine(3).generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=24, stop=(stop, "\x00never")))
    assert any(c.finish_reason == "stop" for c in cut)
    for before, after in zip(free, cut):
        assert stop not in after.text
        assert (after.finish_reason == "stop") == (after.stop_string is not None)
        if after.finish_reason == "stop":
            assert after.stop_string == stop
            assert before.text.find(stop) == len(after.text)  # cut at the stop's first occurrence
            assert after.completion_tokens <= before.completion_tokens
        else:
            assert after.text == before.text


def test_finish_reasons_and_token_counts_agree(make_engine):
    params = SamplingParams(temperature=1.0, max_new_tokens=10, seed=4)
    engine = make_engine(2)
    completions = engine.generate(PROMPTS, params)
    assert [c.prompt_tokens for c in completions] == engine.backend.count_tokens(PROMPTS)
    for c in completions:
        assert c.finish_reason in FINISH_REASONS
        assert 1 <= c.completion_tokens <= params.max_new_tokens
        if c.finish_reason == "length":
            assert c.completion_tokens == params.max_new_tokens


def test_a_prompts_sample_depends_on_its_seed_not_its_batch(make_engine):
    params = SamplingParams(temperature=1.0, max_new_tokens=10, seed=11)
    batched = make_engine(4).generate(PROMPTS, params)
    alone = make_engine(1).generate(PROMPTS, params)
    keys = [(p, 0) for p in PROMPTS[::-1]]  # the default keys, given explicitly, in another order
    reordered = make_engine(2).generate(PROMPTS[::-1], params, keys=keys)[::-1]
    assert batched == alone == reordered
    other_seed = make_engine(4).generate(PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=10, seed=12))
    assert other_seed != batched


def test_a_grammar_holds_every_model_backend(make_engine, tiny):
    """One grammar text drives hf, hf-static and vLLM (its "guidance" backend) alike."""
    from selfalign.generation.grammar import accepts

    if isinstance(make_engine(1).backend, FakeBackend):
        pytest.skip("the fake backend has no vocabulary to mask")
    grammar = '%llguidance {}\nstart: ANSWER\nANSWER: / (yes|no)[.!]/\n'
    params = SamplingParams(temperature=1.0, max_new_tokens=30, seed=5, grammar=grammar)
    completions = make_engine(2).generate(PROMPTS, params)
    for c in completions:
        assert accepts(grammar, tiny.tokenizer, c.text), c.text
    assert any(c.finish_reason == "eos" for c in completions)  # the grammar ended, so only end of text was left
    free = make_engine(2).generate(PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=30, seed=5))
    assert not all(accepts(grammar, tiny.tokenizer, c.text) for c in free)


def test_records_have_one_shape(make_engine):
    [completion] = make_engine(1).generate(["User: hi"], SamplingParams(temperature=0, max_new_tokens=4))
    record = generation_record("id-1", "User: hi", completion, {"model": "m"})
    SCHEMAS["generation/1"].validate(record)
    assert set(completion.to_dict()) == {"text", "finish_reason", "prompt_tokens", "completion_tokens", "stop_string"}


def test_the_contract_tests_can_fail():
    """A backend whose samples depend on their batch position breaks the seed test."""
    class BatchDependent(FakeBackend):
        def stream_batch(self, prompts, params, seeds, shared_prefix=None, max_prompt_tokens=None):
            return super().stream_batch(prompts, params, [s + i for i, s in enumerate(seeds)])

    with pytest.raises(AssertionError):
        test_a_prompts_sample_depends_on_its_seed_not_its_batch(
            lambda batch_size: Engine(BatchDependent(), batch_size=batch_size, progress=False))


# vLLM-specific: its finish reasons, refusals and settings.

def _output(text, token_ids, finish_reason, stop_reason=None):
    from types import SimpleNamespace

    return SimpleNamespace(outputs=[SimpleNamespace(text=text, token_ids=token_ids, finish_reason=finish_reason,
                                                    stop_reason=stop_reason)])


def test_vllm_finish_reasons_map_onto_ours():
    from selfalign.generation.vllm import completion_of

    params = SamplingParams(stop=("\nUser:",))
    assert completion_of(_output("hi", [5, 2], "stop"), 7, params) == Completion("hi", "eos", 7, 2)
    assert completion_of(_output("hi", [5, 6, 7], "stop", "\nUser:"), 7, params) == \
        Completion("hi", "stop", 7, 3, "\nUser:")
    assert completion_of(_output("hi there", [5, 6], "length"), 7, params) == Completion("hi there", "length", 7, 2)
    # Had vLLM kept a stop string in the text, it is still cut, and reported.
    assert completion_of(_output("a\nUser: b", [1, 2, 3], "length"), 7, params) == \
        Completion("a", "stop", 7, 3, "\nUser:")
    with pytest.raises(ValueError, match="unexpected reason"):
        completion_of(_output("x", [1], "abort"), 7, params)


def test_vllm_refuses_what_it_cannot_do(vllm_backend, tiny_dir):
    from selfalign.generation.vllm import VLLMBackend

    backend = vllm_backend
    with pytest.raises(ValueError, match="no_repeat_ngram_size"):
        backend.stream_batch(["hi"], SamplingParams(no_repeat_ngram_size=3), [0])
    with pytest.raises(ValueError, match=r"prompt.*set repetition_penalty to 1\.0"):
        backend.stream_batch(["hi"], SamplingParams(repetition_penalty=1.1), [0])
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        VLLMBackend(str(tiny_dir), tensor_parallel_size=0)


def test_vllm_gets_logit_bias_as_token_ids(vllm_backend, monkeypatch):
    from selfalign.generation import first_token_biases

    backend = vllm_backend
    calls = []
    generate = backend.llm.generate

    def recording(inputs, sampling_params, **options):
        outputs = generate(inputs, sampling_params=sampling_params, **options)
        calls.append((sampling_params, outputs))
        return outputs

    monkeypatch.setattr(backend.llm, "generate", recording)
    backend.stream_batch(PROMPTS, SamplingParams(temperature=0, max_new_tokens=8), [0] * len(PROMPTS))
    # The first token of the first answer, as a text: greedy decoding chose it, so the test can fail.
    token = calls[0][1][0].outputs[0].token_ids[0]
    text = backend.tokenizer.decode([token])
    biases = first_token_biases(backend.tokenizer, [(text, -100.0)])
    assert token in biases
    backend.stream_batch(PROMPTS, SamplingParams(temperature=0, max_new_tokens=8, logit_bias=((text, -100.0),)),
                         [0] * len(PROMPTS))
    sampling, outputs = calls[1]
    assert all(s.logit_bias == biases for s in sampling)
    assert all(token not in out.outputs[0].token_ids for out in outputs)


def test_vllm_applies_a_lora_adapter_as_peft_does(vllm_module, tiny_dir, tmp_path):
    """Stage 4's teacher: vLLM applies the adapter directory itself (a LoRARequest). Greedy answers
    with and without it are the Hugging Face backend's, on the model with and without the adapter."""
    from peft import LoraConfig, get_peft_model

    from selfalign.generation.vllm import VLLMBackend
    from selfalign.models import load_model
    from selfalign.training.adapters import adapted_for_generation

    loaded = load_model(str(tiny_dir))
    # Random A and B (peft's default B is zero, which would change nothing), on stage 3's targets.
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(load_model(str(tiny_dir)).model, lora).save_pretrained(tmp_path / "adapter")
    params = SamplingParams(temperature=0, max_new_tokens=12)
    with adapted_for_generation(loaded, tmp_path / "adapter") as teacher:
        hf_adapted = Engine.for_model(teacher, batch_size=5, progress=False).generate(PROMPTS, params)
    hf_base = Engine.for_model(loaded, batch_size=5, progress=False).generate(PROMPTS, params)
    assert hf_adapted != hf_base  # the adapter changes the answers, so the comparison below can fail

    backend = VLLMBackend(str(tiny_dir), adapter=str(tmp_path / "adapter"))
    adapted = Engine(backend, batch_size=5, progress=False).generate(PROMPTS, params)
    backend.lora = None  # the same engine, without the adapter
    base = Engine(backend, batch_size=5, progress=False).generate(PROMPTS, params)
    assert adapted == hf_adapted
    assert base == hf_base


def test_without_vllm_the_backend_says_how_to_install_it(tiny_dir, monkeypatch):
    from selfalign.generation.vllm import VLLMBackend

    monkeypatch.setitem(sys.modules, "vllm", None)  # what `import vllm` meets where it is not installed
    with pytest.raises(ImportError, match=r"selfalign\[vllm\]"):
        VLLMBackend(str(tiny_dir))


def test_unknown_backend_is_refused(tiny):
    with pytest.raises(ValueError, match="unknown backend"):
        engine_for(Settings("tgi", "tiny-random"), tiny)
    with pytest.raises(ValueError, match="engine_for"):
        Engine.for_model(tiny, backend="vllm")


def test_static_decoder_returns_what_generate_returns(tiny):
    """Token for token, padding included, on a left-padded batch with penalties, a logit bias and a
    stop string: the two decode loops, given the same logits processors."""
    import torch

    backend = HFBackend(tiny, static=True)
    params = SamplingParams(temperature=0.8, max_new_tokens=16, seed=2, repetition_penalty=1.3,
                            no_repeat_ngram_size=2, logit_bias=(("the", -3.0), ("e", 2.0)),
                            stop=("e", "a", "o", "t", " "))
    rows = [tiny.tokenizer(p)["input_ids"] for p in PROMPTS]
    width, pad = max(map(len, rows)), tiny.tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    seeds = list(range(len(rows)))
    assert len(backend._processors(params, seeds, mask)) == 4
    static = backend._static_decoder(len(rows), width + 16).decode(
        input_ids, mask, backend._processors(params, seeds, mask), backend._stopping(params), 16, pad)
    reference = tiny.model.generate(
        input_ids=input_ids, attention_mask=mask, max_new_tokens=16, pad_token_id=pad, do_sample=False,
        temperature=None, top_p=None, top_k=None, eos_token_id=backend._eos_ids(),
        logits_processor=backend._processors(params, seeds, mask),
        stop_strings=["e", "a", "o", "t", " "], tokenizer=tiny.tokenizer)
    assert static == reference[:, width:].tolist()
    assert len(static[0]) < 16  # every row stopped early, and the output ends where generate's does


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_hf_and_hf_static_agree_with_penalties_and_logit_bias(tiny, temperature):
    """Through the engine, with and without a shared prefix (whose rows are prefix plus padded
    suffix: the penalties must start after both)."""
    params = SamplingParams(temperature=temperature, max_new_tokens=20, seed=3, repetition_penalty=1.5,
                            no_repeat_ngram_size=2, logit_bias=(("the", -4.0), ("o", 3.0)))
    prefix = "A shared preamble that every prompt starts with, as the principles are.\n"
    for prompts, shared in ((PROMPTS, None), ([prefix + p for p in PROMPTS], prefix)):
        plain, static = (Engine.for_model(tiny, backend=kind, batch_size=3, progress=False).generate(
            prompts, params, shared_prefix=shared) for kind in ("hf", "hf-static"))
        assert plain == static
        unbiased = Engine.for_model(tiny, batch_size=3, progress=False).generate(
            prompts, SamplingParams(temperature=temperature, max_new_tokens=20, seed=3), shared_prefix=shared)
        assert plain != unbiased  # the options changed something


def test_static_backend_reuses_its_decoders(tiny):
    backend = HFBackend(tiny, static=True)
    engine = Engine(backend, batch_size=2, progress=False)
    engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=5))
    # 5 prompts in batches of 2: two full batches share a decoder, the last batch gets its own.
    assert sorted(key[0] for key in backend._decoders) == [1, 2]


def test_a_stage_runs_on_each_backend_and_resumes_on_another(vllm_module, tiny_dir, tmp_path):
    """`--backend` is one flag on the command line; the records do not say which backend wrote them,
    so a run started on one backend may finish on another."""
    import json

    from selfalign.cli import main

    answers = tmp_path / "r" / "baseline" / "answers.jsonl"
    common = ["stage", "baseline", "--run", "r", "--runs-dir", str(tmp_path), "--model", str(tiny_dir),
              "--max-new-tokens", "6"]
    assert main(common + ["--limit", "3", "--backend", "vllm"]) == 0
    first = [json.loads(line) for line in answers.read_text().splitlines()]
    answers.write_text("".join(json.dumps(r) + "\n" for r in first[:2]))  # as if killed before the last
    assert main(common + ["--limit", "3", "--backend", "hf-static"]) == 0
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert rows[:2] == first[:2] and len(rows) == 3 and rows[2]["id"] == first[2]["id"]
    assert {tuple(sorted(r)) for r in rows} == {tuple(sorted(first[0]))}
