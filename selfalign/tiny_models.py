"""The two tiny random models the tests run every stage on: `tiny-random` and `tiny-llama`.

`tiny-random` is a 2-layer Llama with a byte-level tokenizer trained on the fly, built in memory in
about a second. `tiny-llama` has LLaMA-1's own tokenizer and context, for tests and checks:

LLaMA-65B's tokenizer (SentencePiece, 32,000 pieces, a word-start marker "▁" on the first piece of
a text) and its 2,048 positions are what the paper's run must fit. This model has both and random
weights of a few MB, so that every stage can be run on them in seconds: the prompts are counted as
LLaMA counts them, and the training labels and the scorer meet SentencePiece's word-start marker.

The tokenizer is llama.cpp's copy of LLaMA's vocabulary (`ggml-vocab-llama-spm.gguf`), which the
`llama-cpp-python` source distribution carries, pinned by version and sha256. `prepare` takes it
from that archive, downloaded with pip (the one explicit network step, `selfalign model prepare
--name tiny-llama`) or handed in (`--from` the archive or the .gguf file), and checks it against
llama.cpp's own tokenization test vectors, which sit beside it in the archive. transformers reads
the GGUF vocabulary with a Metaspace pre-tokenizer that drops a text's leading space (" Hello" ->
"▁Hello"); SentencePiece adds its "▁" to every text (" Hello" -> "▁", "▁Hello"), as LLaMA's own
tokenizer and llama.cpp do, so the normalizer is set to SentencePiece's before the check.

It does not load or generate (`models.load_model` loads tiny-random and the directory `prepare` writes).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

NAME = "tiny-llama"
SDIST = "llama-cpp-python==0.3.36"
MEMBER = "vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf"
VOCAB_SHA256 = "16c3724582d59aa8bf84711894e833f916ee46a31d80e21312759c48bf8d0e69"
VECTORS = (".inp", ".out")  # llama.cpp's tokenizer test: texts, and the ids its SentencePiece gives them
CONTEXT = 2048  # LLaMA-1's max_position_embeddings (LLaMA-65B's too)
RANDOM_CONTEXT = 8192  # tiny-random's positions
DESCRIPTION = (f"random weights, LLaMA-1's tokenizer (32,000 SentencePiece pieces, from {SDIST}) and context "
               f"({CONTEXT}), for tests")


class PrepareError(RuntimeError):
    """The vocabulary could not be fetched or is not the pinned one; the message says what to do."""


def prepare(target: Path, source: str | Path | None = None, seed: int = 0) -> Path:
    """Write the model directory `target`: the checked tokenizer and seeded random weights.

    `source`: the llama-cpp-python source archive (.tar.gz) or the .gguf vocabulary itself; None
    downloads the archive with pip (76 MB, into a temporary folder that is removed)."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        vocab = _vocabulary(Path(source) if source else _download(Path(tmp)), Path(tmp))
        tokenizer = _tokenizer(vocab)
        checked = _check_vectors(tokenizer, vocab)
        model = _random_model(tokenizer, seed)
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        # The class every transformers version reads a tokenizer.json with, as it is (4.x, which vLLM's
        # CPU build pins, has no TokenizersBackend).
        config_file = partial / "tokenizer_config.json"
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()),
                                           "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2))
        (partial / "selfalign-conversion.json").write_text(json.dumps(
            {"source": str(source or SDIST), "member": MEMBER, "vocab_sha256": VOCAB_SHA256, "seed": seed,
             "test_vectors_checked": checked, "seconds": round(time.perf_counter() - started, 1)}, indent=2))
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)  # a half-written directory is never taken for a prepared one
    return target


def _download(folder: Path) -> Path:
    # The source of this one package: `--no-binary :all:` would build its build tools from source too
    # (minutes on a machine without pip's cache, against seconds).
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", "llama-cpp-python",
               SDIST, "-d", str(folder)]
    try:
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=900)
    except subprocess.CalledProcessError as error:
        last = (error.stderr or "").strip().splitlines()[-1:] or ["(no message)"]
        raise PrepareError(f"pip could not download {SDIST} ({last[0]}); on a machine without a package index, "
                           f"download it elsewhere (pip download --no-deps --no-binary llama-cpp-python {SDIST}) "
                           "and pass the archive: selfalign model prepare --name tiny-llama --from FILE") from None
    found = sorted(folder.glob("llama_cpp_python-*.tar.gz"))
    if not found:
        raise PrepareError(f"pip download {SDIST} wrote no source archive into {folder}")
    return found[0]


def _vocabulary(source: Path, folder: Path) -> Path:
    """The checked .gguf (with its test vectors beside it, when the source has them) in `folder`."""
    if not source.is_file():
        raise PrepareError(f"{source} does not exist (expected the {SDIST} source archive or {Path(MEMBER).name})")
    vocab = folder / Path(MEMBER).name
    if source.suffix == ".gguf":
        shutil.copyfile(source, vocab)
        for suffix in VECTORS:
            if source.with_name(source.name + suffix).is_file():
                shutil.copyfile(source.with_name(source.name + suffix), vocab.with_name(vocab.name + suffix))
    else:
        try:
            with tarfile.open(source) as archive:
                members = {m.name.split("/", 1)[-1]: m for m in archive.getmembers() if m.isfile()}
                for name in [MEMBER] + [MEMBER + s for s in VECTORS]:
                    if name not in members:
                        raise PrepareError(f"{source}: no {name} in the archive (is it {SDIST}'s source?)")
                    with archive.extractfile(members[name]) as data, open(folder / Path(name).name, "wb") as out:
                        shutil.copyfileobj(data, out)
        except (tarfile.TarError, OSError, EOFError) as error:
            raise PrepareError(f"{source}: not a readable source archive ({error})") from None
    digest = hashlib.sha256(vocab.read_bytes()).hexdigest()
    if digest != VOCAB_SHA256:
        raise PrepareError(f"{source}: {Path(MEMBER).name} has sha256 {digest}, not the pinned {VOCAB_SHA256} "
                           f"({SDIST})")
    return vocab


def _tokenizer(vocab: Path):
    from tokenizers import normalizers
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(vocab.parent, gguf_file=vocab.name)
    backend = tokenizer.backend_tokenizer
    # SentencePiece's normalization: "▁" before the text, every space a "▁" (LLaMA's tokenizer.json does the same).
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
    tokenizer.model_max_length = CONTEXT
    return tokenizer


def _check_vectors(tokenizer, vocab: Path) -> int:
    """How many of llama.cpp's test texts tokenize to its ids (all must); 0 when they are absent."""
    texts_file, ids_file = (vocab.with_name(vocab.name + s) for s in VECTORS)
    if not texts_file.is_file() or not ids_file.is_file():
        return 0
    texts = texts_file.read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    expected = ids_file.read_text(encoding="utf-8").split("\n")
    wrong = [text for text, ids in zip(texts, expected)
             if tokenizer(text, add_special_tokens=False)["input_ids"] != [int(i) for i in ids.split()]]
    if wrong:
        raise PrepareError(f"{len(wrong)} of llama.cpp's {len(texts)} tokenizer test texts tokenize differently "
                           f"here than under SentencePiece (first: {wrong[0][:40]!r}); this transformers or "
                           "tokenizers version reads the vocabulary otherwise")
    return len(texts)


def _random_model(tokenizer, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    # LLaMA-1's layout (no grouped-query attention, untied embeddings, bos 1, eos 2, no pad), small.
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=CONTEXT,
                         rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=None)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = None
    return model


def tiny_random_model(seed: int = 0, hidden_size: int = 64, num_layers: int = 2, context: int = RANDOM_CONTEXT):
    """A random-weight Llama and a byte-level BPE tokenizer, built in memory in about a second.

    Its text is nonsense; it exists so that tests and smoke runs exercise the real code paths
    (batching, padding, stop strings, caching, LoRA) without any download.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = [
        "User: What is the capital of France? Assistant: Paris is the capital of France.",
        "The quick brown fox jumps over the lazy dog. 0123456789 ### User Watson Dromedary",
        "I should follow rules 1 (ethical), 2 (informative) and 3 (helpful) when answering.",
    ]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="<pad>", model_max_length=context)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=context, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.eval()
    return model, tokenizer
