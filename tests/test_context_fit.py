"""The dry run looks at the model: each stage's longest prompt, in the model's own tokens, against its
context, from config.json and the tokenizer alone (no weights); a profile whose prompts cannot fit
is refused by stage and numbers, and bad model files are one line naming the file."""

import json
import shutil

import pytest

from conftest import tiny_llama_dir
from selfalign import context_fit
from selfalign.cli import main
from selfalign.generation.hf import HFBackend
from selfalign.principles import load_principle_set, render_prefix, render_prompt
from selfalign.profiles import load_profile, resolve

# LLaMA-65B's config.json (Meta's release as transformers converts it); no weights beside it.
LLAMA_65B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
             "intermediate_size": 22016, "num_hidden_layers": 80, "num_attention_heads": 64,
             "num_key_value_heads": 64, "max_position_embeddings": 2048, "vocab_size": 32000, "rms_norm_eps": 1e-5,
             "bos_token_id": 1, "eos_token_id": 2}
GENERATING = {"prompts", "self-align", "baseline", "verbose", "evaluate"}


def llama_65b(tmp_path, **config) -> str:
    """A model directory of LLaMA-1's tokenizer and LLaMA-65B's config (with `config` changed)."""
    folder = tmp_path / "llama-65b"
    folder.mkdir()
    for tokenizer_file in tiny_llama_dir().glob("tokenizer*"):
        shutil.copy(tokenizer_file, folder)
    (folder / "config.json").write_text(json.dumps({**LLAMA_65B, **config}))
    return str(folder)


def dry_run(*argv) -> int:
    return main(["run", "--dry-run", "--direct", *argv])


def test_the_full_profile_fits_llama_65b(tmp_path, capsys):
    """The acceptance test of issue 28: the paper's settings on the paper's model fit every stage."""
    model = llama_65b(tmp_path)
    assert dry_run("--profile", "full", "-p", "model", model) == 0, capsys.readouterr().err
    out, err = capsys.readouterr()
    assert json.loads(out)["self-align"]["model"] == model  # the settings are still the JSON on stdout
    assert f"prompt lengths in the tokens of {model}, against its context of 2048 positions" in err
    fit = context_fit.check(resolve(load_profile("full"), {"model": model}).stages)
    assert {row["stage"] for row in fit.rows} >= GENERATING | {"engrave"}
    assert fit.misfits() == [] and all(row["context"] == 2048 for row in fit.rows)
    # Only a sampled request may run over in its worst case: stage 1 drops that one and makes the others.
    assert all(row["what"].startswith("Self-Instruct") for row in fit.rows if row["some"])


def test_a_context_too_small_is_refused_naming_the_stage_and_the_numbers(tmp_path, capsys):
    model = llama_65b(tmp_path, max_position_embeddings=1024)
    assert dry_run("--profile", "full", "-p", "model", model) == 1
    err = capsys.readouterr().err
    (refusal,) = [line for line in err.splitlines() if line.startswith("selfalign: error:")]
    needs = next(r for r in context_fit.check(resolve(load_profile("full"), {"model": model}).stages).rows
                 if r["stage"] == "self-align")
    assert (f"stage self-align (principles, exemplars and a 200-token query): {needs['prompt_tokens']} prompt tokens "
            f"+ 256 new = {needs['prompt_tokens'] + 256} > 1024 positions of {model}") in refusal


def test_stage_two_is_counted_as_the_engine_counts_it(tmp_path, tiny_llama):
    """Against the reference: the engine's own count of the rendered prompt, prefix and BOS included."""
    prompts = tmp_path / "prompts.jsonl"
    queries = ["Name a prime.", "Explain, step by step and with an example, how a bicycle's gears work. " * 4]
    prompts.write_text("".join(json.dumps({"id": str(i), "prompt": q}) + "\n" for i, q in enumerate(queries)))
    stages = resolve({}, {"model": str(tiny_llama_dir()), "self-align.prompts": str(prompts)},
                     stages=["self-align"]).stages
    (row,) = context_fit.check(stages).rows
    principle_set = load_principle_set()
    prefix = render_prefix(principle_set, "Watson")
    engine_counts = HFBackend(tiny_llama).count_tokens([render_prompt(principle_set, q, "Watson") for q in queries],
                                                        prefix)
    assert row["prompt_tokens"] == max(engine_counts) and row["new_tokens"] == 160
    assert row["what"] == "principles, exemplars and the longest of 2 prompts"
    bound = context_fit.check(resolve({}, {"model": str(tiny_llama_dir())}, stages=["self-align"]).stages).rows[0]
    empty = HFBackend(tiny_llama).count_tokens([render_prompt(principle_set, "", "Watson")], prefix)[0]
    assert bound["prompt_tokens"] == empty + context_fit.QUERY_TOKENS


def test_a_model_that_is_not_here_is_not_checked_and_the_settings_still_print(capsys):
    assert dry_run("--profile", "full") == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["self-align"]["model"] == "/path/to/llama-65b"
    assert ("prompt lengths not checked for prompts, self-align, baseline, engrave, verbose, evaluate: model "
            "'/path/to/llama-65b' is not a directory on this machine") in err


def test_a_hub_id_out_of_reach_is_one_line(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as where no hub answers, without waiting for one
    assert dry_run("--profile", "full", "-p", "model", "no-such-org/no-such-model", "--only", "self-align") == 0
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "not checked" in line]
    assert "hub id 'no-such-org/no-such-model' cannot be read here" in line


@pytest.mark.parametrize("broken, message", [
    ("config.json", "{folder}/config.json does not exist"),
    ("tokenizer", "{folder} has no tokenizer (none of tokenizer.json, tokenizer.model, vocab.json)"),
    ("bos", "{folder}/tokenizer_config.json: the tokenizer has no BOS token"),
])
def test_bad_model_files_are_one_line_naming_the_file(tmp_path, capsys, broken, message):
    folder = llama_65b(tmp_path)
    if broken == "config.json":
        (tmp_path / "llama-65b" / "config.json").unlink()
    elif broken == "tokenizer":
        for path in (tmp_path / "llama-65b").glob("tokenizer*"):
            path.unlink()
    else:
        settings = tmp_path / "llama-65b" / "tokenizer_config.json"
        settings.write_text(json.dumps({**json.loads(settings.read_text()), "bos_token": None}))
    assert dry_run("--profile", "full", "-p", "model", folder, "--only", "self-align") == 1
    (error,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("selfalign: error:")]
    assert error.startswith(f"selfalign: error: {message.format(folder=folder)}")
