"""Greedy decoding speed of a LLaMA-7B-shaped model on one GPU, against the card's memory floor.

Builds a random-weight bf16 `LlamaForCausalLM` (7B shapes) directly on the GPU, measures the card's
memory bandwidth, then times greedy decoding (random prompts, no EOS stop) with several backends,
one table row per backend and batch size, printed as soon as it is done:

- `hf-dynamic`: plain `model.generate` (dynamic cache), the baseline;
- `manual-cudagraph`: prefill into a `StaticCache`, then one eager decode step captured once as a
  CUDA graph and replayed (no compiler, so seconds of set-up);
- `manual-compile`: the same step through `torch.compile(mode="reduce-overhead", fullgraph=True)`;
- `hf-static-compile`: `model.generate(cache_implementation="static")`, which compiles the decode
  forward itself on CUDA (its default `CompileConfig`, with `dynamic=False`);
- `engine-static` (greedy) and `engine-static-sampled` (temperature 0.7, top-p 0.95, the engine's
  per-row seeded sampler): the engine's "hf-static" backend, `selfalign.generation.StaticDecoder`, compiled
  as it is on CUDA, with the EOS check and output bookkeeping a stage pays for ("hf", the default
  backend, is `model.generate`: the `hf-dynamic` row).

`--check-engine` first runs the engine on a tiny random float32 model on the card, "hf" against
"hf-static" (compiled), sampling with stop strings, penalties and a shared prefix, and prints how
many completions are identical.

The floor of one decode step is the bytes it must read (every weight except the embedding table,
of which a lookup reads `batch` rows, plus K and V of every sequence at the mean decode context)
over the bytes per second a read-only kernel reaches (a `sum` over a large tensor); a copy's rate is
printed too. It imports the standard library, torch, transformers and (for the engine rows) `selfalign.generation`,
downloads nothing, and deliberately does not load real weights: speed does not depend on their values.
`--tiny` runs a 2-layer model on CPU in seconds (the compile variants are skipped there).
"""

from __future__ import annotations

import argparse
import functools
import gc
import inspect
import json
import time

import sys
from pathlib import Path

import torch
import transformers
from transformers import CompileConfig, LlamaConfig, LlamaForCausalLM, StaticCache

LLAMA_7B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                intermediate_size=11008, vocab_size=32000)
TINY = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            intermediate_size=688, vocab_size=1000)
VARIANTS = ["hf-dynamic", "manual-eager", "manual-cudagraph", "manual-compile", "hf-static-compile", "engine-static",
            "engine-static-sampled"]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # selfalign, from a checkout without installing it


def kv_bytes_per_token(config, dtype_bytes: int) -> int:
    """Bytes of K and V that one token adds to the cache, over all layers."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * dtype_bytes


def decode_floor(weight_bytes, kv_per_token, batch, prompt_tokens, new_tokens, read_bytes_per_s):
    """(bytes, seconds) one decode step must read at least, at the mean context of the decode steps.

    The prefill yields the first new token; decode step j (1 .. new-1) attends over prompt + j
    tokens, so the mean context is prompt + new/2.
    """
    step_bytes = weight_bytes + kv_per_token * batch * (prompt_tokens + new_tokens / 2)
    return step_bytes, step_bytes / read_bytes_per_s


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    started = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - started


def bandwidth(device, nbytes: int, repeats: int = 10) -> dict:
    """Bytes per second of a read-only kernel (`sum`) and of a copy, on one large bf16 tensor."""
    x = torch.ones(nbytes // 2, dtype=torch.bfloat16, device=device)
    y = torch.empty_like(x)

    def seconds(fn):
        fn()  # first touch and kernel selection stay out of the timing
        if device.type != "cuda":
            return timed(lambda: [fn() for _ in range(repeats)], device)[1] / repeats
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000 / repeats

    sum_s, copy_s = seconds(lambda: x.sum()), seconds(lambda: y.copy_(x))
    return {"buffer_bytes": nbytes, "sum_read_Bps": nbytes / sum_s, "copy_read_Bps": nbytes / copy_s,
            "copy_read_plus_write_Bps": 2 * nbytes / copy_s}


def build_model(shape: dict, device, dtype):
    config = LlamaConfig(**shape, max_position_embeddings=4096, initializer_range=0.02,
                         eos_token_id=None, pad_token_id=0, bos_token_id=None)
    with torch.device(device):  # built in place: a 7B model never passes through host memory
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    model.eval().requires_grad_(False)
    model.generation_config.eos_token_id = None  # no early stop: every row decodes all its tokens
    model.generation_config.pad_token_id = 0
    return model


def hf_generate(model, prompts, new_tokens, static=False):
    kwargs = dict(attention_mask=torch.ones_like(prompts), do_sample=False, max_new_tokens=new_tokens)
    if static:
        config = CompileConfig(dynamic=False)  # one specialised graph per batch size, as a server would
        config._compile_all_devices = prompts.device.type != "cuda"  # only reached with --compile-on-cpu
        kwargs.update(cache_implementation="static", compile_config=config)
    return model.generate(prompts, **kwargs)[:, prompts.shape[1]:]


def run_hf(model, prompts, new_tokens, static):
    device, result = prompts.device, {}
    if static:  # the first call compiles and records; what it costs beyond a warm call is compile_s
        result["first_call_s"] = timed(lambda: hf_generate(model, prompts, new_tokens, True), device)[1]
    hf_generate(model, prompts, min(2, new_tokens), static)
    result["prefill_s"] = timed(lambda: hf_generate(model, prompts, 1, static), device)[1]
    tokens, total_s = timed(lambda: hf_generate(model, prompts, new_tokens, static), device)
    result["decode_s"] = total_s - result["prefill_s"]
    if static:
        result["compile_s"] = result.pop("first_call_s") - total_s
    return tokens, result


def run_manual(model, prompts, new_tokens, how, repeats=2):
    """Prefill into a StaticCache, then `new_tokens - 1` fixed-shape steps: eager, CUDA graph or compiled."""
    device, (batch, prompt_len) = prompts.device, prompts.shape
    # room for the warm-up steps below, which run before the cache is reset for the timed runs
    cache = StaticCache(config=model.config, max_cache_len=prompt_len + max(new_tokens, 4))
    tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)  # the step reads and rewrites these
    positions = torch.zeros(1, 1, dtype=torch.long, device=device)
    cache_position = torch.zeros(1, dtype=torch.long, device=device)
    # transformers 5.x renamed `past_key_values` to `cache`, and its later versions track the write
    # position inside StaticCache; earlier ones need `cache_position`. An unknown keyword would be
    # swallowed by **kwargs and the step would run without its cache, so ask the signature.
    accepted = inspect.signature(model.forward).parameters
    cache_kw = {("cache" if "cache" in accepted else "past_key_values"): cache, "use_cache": True}
    wants_position = "cache_position" in accepted

    def prefill():
        cache.reset()
        extra = {"cache_position": torch.arange(prompt_len, device=device)} if wants_position else {}
        logits = model(input_ids=prompts, logits_to_keep=1, **cache_kw, **extra).logits
        tokens.copy_(logits[:, -1].argmax(-1, keepdim=True))
        positions.fill_(prompt_len)
        cache_position.fill_(prompt_len)

    def step():
        extra = {"cache_position": cache_position} if wants_position else {}
        logits = model(input_ids=tokens, position_ids=positions, **cache_kw, **extra).logits
        tokens.copy_(logits[:, -1].argmax(-1, keepdim=True))
        positions.add_(1)
        cache_position.add_(1)

    prefill()  # allocates the cache, so its addresses are fixed before any graph sees them
    run_step, started = step, time.perf_counter()
    if how == "compile":
        for buffer in (tokens, positions, cache_position):
            torch._dynamo.mark_static_address(buffer)  # mutated in place: cudagraphs must not copy them
        compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)

        def run_step():
            torch.compiler.cudagraph_mark_step_begin()
            compiled()

        for _ in range(3):  # compile, cudagraph warm-up, record
            run_step()
    elif how == "cudagraph":
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graph asks
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        run_step = graph.replay
    sync(device)
    result = {"compile_s": time.perf_counter() - started if how != "eager" else None}

    def decode(out):
        for i in range(1, new_tokens):
            run_step()
            out[:, i] = tokens[:, 0]

    best = None
    for _ in range(repeats):
        prefill_s = timed(prefill, device)[1]
        out = torch.empty(batch, new_tokens, dtype=torch.long, device=device)
        out[:, 0] = tokens[:, 0]
        decode_s = timed(functools.partial(decode, out), device)[1]
        if best is None or decode_s < best[1]:
            best = (prefill_s, decode_s, out)
    result["prefill_s"], result["decode_s"] = best[0], best[1]
    return best[2], result


def run_engine_static(model, prompts, new_tokens, repeats=2, sample=False):
    """The engine's static backend at the token level (no tokenizer): the decoder a stage gets."""
    from transformers import LogitsProcessorList, StoppingCriteriaList
    from transformers.generation.stopping_criteria import EosTokenCriteria

    from selfalign.generation import StaticDecoder
    from selfalign.generation.sampler import NucleusSampler

    device, (batch, prompt_len) = prompts.device, prompts.shape
    mask = torch.ones_like(prompts)
    decoder = StaticDecoder(model, batch, prompt_len + new_tokens, compile=device.type == "cuda")
    stopping = StoppingCriteriaList([EosTokenCriteria(2)])  # a stage always checks for EOS

    def decode(steps):
        processors = LogitsProcessorList([NucleusSampler(0.7, 0.95, range(batch), device)] if sample else [])
        return decoder.decode(prompts, mask, processors, stopping, steps, 0)

    _, compile_s = timed(lambda: decode(new_tokens), device)  # compiles and records the step
    best = None
    for _ in range(repeats):
        prefill_s = timed(lambda: decode(1), device)[1]
        out, total_s = timed(lambda: decode(new_tokens), device)
        if best is None or total_s < best[1] + best[0]:
            best = (prefill_s, total_s - prefill_s, out, total_s)
    rows = torch.tensor([r + [0] * (new_tokens - len(r)) for r in best[2]], device=device)
    return rows, {"prefill_s": best[0], "decode_s": best[1], "compile_s": compile_s - best[3],
                  "note": "" if decoder.compiled else "eager: no CUDA here"}


def check_engine(device) -> dict:
    """hf vs hf-static (compiled where the card allows) on a tiny random float32 model, through the Engine."""
    from selfalign.generation import Engine, HFBackend, SamplingParams
    from selfalign.models import LoadedModel, tiny_random_model

    model, tokenizer = tiny_random_model()
    loaded = LoadedModel(model.to(device), tokenizer, "tiny-random", None)
    prompts = ["User: hello there", "User: what is the capital of France? Assistant:", "x",
               "The quick brown fox jumps over the lazy dog", "I should follow rules 1 and 2"]
    prefix = "A shared preamble that every prompt starts with, as the principles are.\n"
    cases = [("greedy", SamplingParams(temperature=0, max_new_tokens=24), prompts, None),
             ("sampled, stops, penalties", SamplingParams(temperature=0.8, max_new_tokens=24, seed=3, stop=("e", "\n"),
                                                          repetition_penalty=1.2, no_repeat_ngram_size=3), prompts, None),
             ("sampled, shared prefix", SamplingParams(temperature=0.7, max_new_tokens=24, seed=5),
              [prefix + p for p in prompts], prefix)]
    plain = Engine(HFBackend(loaded), batch_size=3, progress=False, context_length=loaded.context_length)
    static = Engine(HFBackend(loaded, static=True), batch_size=3, progress=False, context_length=loaded.context_length)
    result = {}
    for name, params, texts, shared in cases:
        a = plain.generate(texts, params, shared_prefix=shared)
        started = time.perf_counter()
        b = static.generate(texts, params, shared_prefix=shared)
        result[name] = {"identical": sum(x == y for x, y in zip(a, b)), "of": len(a),
                        "seconds": round(time.perf_counter() - started, 2)}
    result["compiled"] = all(d.compiled for d in static.backend._decoders.values())
    return result


def row_for(variant, tokens, timing, batch, args, floor, reference):
    steps = args.new_tokens - 1
    step_bytes, floor_s = floor(batch)
    step_s = timing["decode_s"] / steps
    same = None if reference is None else (tokens == reference[0]).float().mean().item()
    return {"variant": variant, "batch": batch, "prefill_s": timing["prefill_s"], "decode_ms_step": 1e3 * step_s,
            "decode_tok_s": batch * steps / timing["decode_s"], "compile_s": timing.get("compile_s"),
            "floor_ms_step": 1e3 * floor_s, "floor_bytes_step": step_bytes, "pct_floor": 100 * floor_s / step_s,
            "same_tokens": same, "reference": None if reference is None else reference[1],
            "note": timing.get("note", "")}


COLUMNS = ["variant", "batch", "prefill_s", "decode_ms_step", "decode_tok_s", "compile_s", "floor_ms_step",
           "pct_floor", "same_tokens", "reference", "elapsed_s", "note"]


def cell(value):
    if value is None:
        return ""
    return f"{value:.3g}" if isinstance(value, float) and abs(value) < 10 else (
        f"{value:.1f}" if isinstance(value, float) else str(value).replace("|", "/").replace("\n", " ")[:160])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="2-layer hidden-256 model; on CPU when no GPU")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--prompt-tokens", type=int, default=None, help="default 256 (tiny: 32)")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 128 (tiny: 16)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--time-budget", type=float, default=None, help="seconds; later rows are skipped")
    parser.add_argument("--bandwidth-gb", type=float, default=None, help="buffer size (default 2, tiny 0.06)")
    parser.add_argument("--compile-on-cpu", action="store_true", help="run the compile variants on CPU too")
    parser.add_argument("--out", default=None, help="JSON file, rewritten after every row")
    parser.add_argument("--check-engine", action="store_true", help="first compare hf and hf-static on a tiny model")
    args = parser.parse_args(argv)
    args.prompt_tokens = args.prompt_tokens or (32 if args.tiny else 256)
    args.new_tokens = args.new_tokens or (16 if args.tiny else 128)
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # CPU bf16 is slow and only a test
    if device.type == "cpu":
        torch.set_num_threads(1)  # a tiny model is per-op overhead, where a second thread only adds contention
    torch.manual_seed(0)

    engine_check = None
    if args.check_engine:
        try:
            engine_check = check_engine(device)
        except Exception as error:  # the timing rows are still worth having
            engine_check = {"error": f"{type(error).__name__}: {error}"}
        print(f"engine check (tiny random float32 model, hf vs hf-static): {json.dumps(engine_check)}", flush=True)
        torch._dynamo.reset()
    bw = bandwidth(device, int(1e9 * (args.bandwidth_gb or (0.0625 if args.tiny else 2))))
    model = build_model(TINY if args.tiny else LLAMA_7B, device, dtype)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    weight_bytes -= model.get_input_embeddings().weight.numel() * dtype.itemsize
    kv_token = kv_bytes_per_token(model.config, dtype.itemsize)

    def floor(batch):
        return decode_floor(weight_bytes, kv_token, batch, args.prompt_tokens, args.new_tokens, bw["sum_read_Bps"])

    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    report = {"device": name, "torch": torch.__version__, "transformers": transformers.__version__,
              "dtype": str(dtype), "config": TINY if args.tiny else LLAMA_7B, "bandwidth": bw,
              "weight_bytes_read_per_step": weight_bytes, "kv_bytes_per_token": kv_token,
              "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "engine_check": engine_check,
              "rows": []}
    print(f"{name}, torch {torch.__version__}, transformers {transformers.__version__}, {dtype}; "
          f"read bandwidth (sum) {bw['sum_read_Bps'] / 1e9:.0f} GB/s; copy {bw['copy_read_Bps'] / 1e9:.0f} GB/s "
          f"read ({bw['copy_read_plus_write_Bps'] / 1e9:.0f} GB/s read+write), "
          f"{bw['buffer_bytes'] / 1e9:.2f} GB buffer")
    print(f"floor per decode step = (weights {weight_bytes / 1e9:.3f} GB [all but the embedding table] + "
          f"KV {kv_token} B/token x batch x mean context {args.prompt_tokens + args.new_tokens / 2:g} "
          f"[prompt + new/2]) / {bw['sum_read_Bps'] / 1e9:.0f} GB/s; build+bandwidth took "
          f"{time.perf_counter() - started:.1f} s\n")
    print("| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS), flush=True)

    batches = [int(b) for b in args.batches.split(",")]
    vocab = model.config.vocab_size
    prompts = {b: torch.randint(1, vocab, (b, args.prompt_tokens), device=device) for b in batches}
    reference = {}
    for variant in args.variants.split(","):
        for batch in batches:
            row = {"variant": variant, "batch": batch}
            compiles = variant in ("manual-compile", "hf-static-compile")  # engine-static is eager off CUDA
            if args.time_budget is not None and time.perf_counter() - started > args.time_budget:
                row["note"] = f"skipped: past the {args.time_budget:g} s time budget"
            elif compiles and device.type != "cuda" and not args.compile_on_cpu:
                row["note"] = "skipped: compile variant on CPU (pass --compile-on-cpu)"
            else:
                try:
                    if variant.startswith("hf-"):
                        tokens, timing = run_hf(model, prompts[batch], args.new_tokens, static=compiles)
                    elif variant.startswith("engine-static"):
                        tokens, timing = run_engine_static(model, prompts[batch], args.new_tokens,
                                                           sample=variant.endswith("sampled"))
                    else:
                        how = {"manual-compile": "compile", "manual-cudagraph": "cudagraph",
                               "manual-eager": "eager"}[variant]
                        if how == "cudagraph" and device.type != "cuda":
                            how = "eager"
                        tokens, timing = run_manual(model, prompts[batch], args.new_tokens, how)
                        timing["note"] = "eager: no CUDA here" if how != variant.split("-")[1] else ""
                    # Random bf16 weights give near-tied logits, so greedy paths with different
                    # kernels drift apart; the captured/compiled steps are checked against the same
                    # step run eagerly, whose kernels they replay.
                    if variant in ("hf-dynamic", "manual-eager"):
                        reference[(variant, batch)] = (tokens, variant)
                    key = ("manual-eager" if variant.startswith(("manual-", "engine-")) and variant != "manual-eager"
                           else "hf-dynamic", batch)
                    row = row_for(variant, tokens, timing, batch, args, floor,
                                  reference.get(key) if variant != key[0] else None)
                except Exception as error:  # one broken backend must not cost the other rows
                    row["note"] = f"error: {type(error).__name__}: {error}"
                finally:
                    torch._dynamo.reset()  # frees graphs that pin this row's cache
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            row["elapsed_s"] = time.perf_counter() - started
            report["rows"].append(row)
            print("| " + " | ".join(cell(row.get(c)) for c in COLUMNS) + " |", flush=True)
            if args.out:
                with open(args.out, "w") as handle:
                    json.dump(report, handle, indent=1)
    print(f"\ntotal {time.perf_counter() - started:.1f} s", flush=True)
    return report


if __name__ == "__main__":
    transformers.logging.set_verbosity_error()  # generate's per-call advice would split the table
    main()
