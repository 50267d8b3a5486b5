"""The ``vlmkit`` command line: one dispatch table, ``--help`` on every command.

``vlmkit train | demo | sweep | eval | chat | serve | export | checkpoint | plan | list`` (also ``python -m vlmkit ...``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("vlmkit")


# ---------------------------------------------------------------------------------------------
# list

def _rows_encoders() -> list[tuple[str, ...]]:
    from vlmkit.models.vision import VISION_TOWERS

    return [(n, s.layout, "yes" if s.has_cls else "no", s.description, s.example) for n, s in VISION_TOWERS.items()]


def _rows_connectors() -> list[tuple[str, ...]]:
    from vlmkit.models.connectors import CONNECTORS

    rows = []
    for name, factory in CONNECTORS.items():
        doc = (getattr(factory, "__doc__", None) or "").strip().splitlines()
        rows.append((name, doc[0] if doc and not name.startswith("mlp") else f"{name[3]} linear layers with GELU (LLaVA-1.5 for mlp2x)"))
    return rows


def _rows_backbones() -> list[tuple[str, ...]]:
    from vlmkit.models.language import BACKBONES

    return [(n, s.kind, ",".join(s.model_types), s.sizes, s.default_template, s.hidden_size_field, s.used_by)
            for n, s in BACKBONES.items()]


def _rows_templates() -> list[tuple[str, ...]]:
    from vlmkit.processing.templates import TEMPLATES

    rows = []
    for name, t in TEMPLATES.items():
        what = "the tokenizer's own Jinja chat template" if name == "tokenizer" else f"stops at {', '.join(t.stop) or '-'}"
        rows.append((name, what))
    return rows


def _rows_formats() -> list[tuple[str, ...]]:
    from vlmkit.formats import FORMATS

    return [(n, "read + write" if f.writable else "read", f.looks_for, f.description) for n, f in FORMATS.items()]


def _rows_strategies() -> list[tuple[str, ...]]:
    from vlmkit.training import deepspeed  # noqa: F401  (registers the deepspeed strategy)
    from vlmkit.training.strategies import STRATEGIES

    rows = []
    for name, cls in STRATEGIES.items():
        try:
            cls.check_available()
            status = "available"
        except Exception as exc:  # noqa: BLE001 - shown as the reason
            status = f"unavailable: {exc}"
        rows.append((name, cls.description, status))
    return rows


def _rows_deepspeed() -> list[tuple[str, ...]]:
    import json

    from vlmkit.recipes import deepspeed_config_path, list_deepspeed_configs

    rows = []
    for name in list_deepspeed_configs():
        zero = json.loads(deepspeed_config_path(name).read_text()).get("zero_optimization", {})
        offload = ", ".join(k.replace("offload_", "") for k in ("offload_optimizer", "offload_param") if k in zero) or "-"
        rows.append((name, str(zero.get("stage", 0)), offload, str(deepspeed_config_path(name))))
    return rows


def _rows_recipes() -> list[tuple[str, ...]]:
    from vlmkit.config import BENCHMARKS, load_recipe
    from vlmkit.planning import parameter_counts
    from vlmkit.planning.report import count
    from vlmkit.recipes import list_recipes

    rows = []
    for name in list_recipes():
        recipe = load_recipe(name)
        published = recipe.published
        total = sum(parameter_counts(recipe.model).values())
        scores = ", ".join(f"{b} {published.scores[b]:g}" for b in BENCHMARKS if b in published.scores)
        rows.append((name, published.system or recipe.description.split(".")[0], count(total), published.gpus or "CPU",
                     scores or "-"))
    return rows


LISTS: dict[str, tuple[tuple[str, ...], Callable[[], list[tuple[str, ...]]]]] = {
    "encoders": (("id", "layout", "cls", "description", "example checkpoint"), _rows_encoders),
    "connectors": (("id", "description"), _rows_connectors),
    "backbones": (("family", "kind", "model_type", "sizes", "template", "width from", "used by"), _rows_backbones),
    "templates": (("id", "notes"), _rows_templates),
    "recipes": (("recipe", "system", "parameters", "trained on", "published scores (VQAv2 test-dev, MME perception)"), _rows_recipes),
    "formats": (("format", "vlmkit can", "detected by", "description"), _rows_formats),
    "strategies": (("strategy", "description", "here"), _rows_strategies),
    "deepspeed": (("config", "ZeRO stage", "offload", "file"), _rows_deepspeed),
}


def print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for line in (header, tuple("-" * w for w in widths), *rows):
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip())


def cmd_list(args: argparse.Namespace) -> int:
    header, rows = LISTS[args.what]
    print_table(header, rows())
    return 0


# ---------------------------------------------------------------------------------------------
# train / demo

class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (it may be replaced)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _setup_console_logging(verbose: bool) -> None:
    for old in [h for h in log.handlers if getattr(h, "vlmkit_console", False)]:
        log.removeHandler(old)  # main() may run more than once in a process
    import os

    handler = _StderrHandler()
    handler.vlmkit_console = True
    rank = int(os.environ.get("RANK", "0"))  # set by torchrun / accelerate launch for every process
    if rank:  # the other processes of a distributed run speak only when something is wrong
        handler.setFormatter(logging.Formatter(f"[rank {rank}] %(message)s"))
        handler.setLevel(logging.WARNING)
    else:
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    for noisy in ("transformers", "accelerate", "peft", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import transformers

    transformers.utils.logging.set_verbosity_error()


def cmd_train(args: argparse.Namespace) -> int:
    from vlmkit.config import load_recipe
    from vlmkit.training.run import run_training

    from vlmkit import distributed
    from vlmkit.training.trainer import TrainingStopped

    recipe = load_recipe(args.recipe, args.overrides + (["model.allow_pickle=true"] if args.allow_pickle else []))
    if args.tiny_twin:
        from vlmkit.recipes.twin import tiny_twin

        recipe = tiny_twin(recipe, f"{recipe.train.output_dir.rstrip('/')}-twin")
        log.info("training the tiny twin of %s (its architecture kinds and stage policies, small and random, on easy-VQA) "
                 "in %s", args.recipe, recipe.train.output_dir)
    stages = args.stages.split(",") if args.stages else None
    try:
        summary = run_training(recipe, only_stages=stages, evaluate=not args.no_eval)
    except TrainingStopped as stop:
        if distributed.is_main():
            print(f"vlmkit train: {stop}", file=sys.stderr)
        return 143  # 128 + SIGTERM: stopped on request, not finished (a job scheduler should run it again)
    if distributed.is_main():
        _print_summary(summary)
    return 0


def cmd_checkpoint(args: argparse.Namespace) -> int:
    from vlmkit.training.consolidate import consolidate

    out = consolidate(Path(args.run), args.stage, args.step, args.output)
    print(f"consolidated model: {out}  (vlmkit chat --model {out}; vlmkit export --format hf-llava {out} DST)")
    return 0


def _print_summary(summary) -> None:
    print(f"\nrun folder: {summary.output_dir}")
    for name, info in summary.stages.items():
        reused = " (reused from disk)" if info.get("reused") else ""
        print(f"  stage {name:<10} {info.get('steps', '?')} steps, final loss {info.get('final_loss', float('nan')):.4f}, "
              f"{info.get('seconds', 0):.0f} s{reused}")
    if summary.model_dir:
        print(f"  model: {summary.model_dir}")
    for fmt, folder in summary.exports.items():
        print(f"  exported as {fmt}: {folder}")
    if summary.eval:
        print_eval(summary.eval)


def print_eval(e: dict) -> None:
    """The evaluation a run recorded in ``eval.json``: the task by name, its report scores, the
    per-type breakdown where the task has one."""
    from vlmkit.evaluation.runner import headline
    from vlmkit.evaluation.tasks import TASKS

    unit = "%" if TASKS.get(e["task"]).percent else ""
    count = e.get("total", e.get("questions"))
    shown = dict(headline(e["task"], e))
    main = e["metric"]
    extra = "".join(f"; {metric.replace('_', ' ')} {value}{unit}" for metric, value in shown.items() if metric != main)
    of = f" ({e['correct']}/{count})" if "correct" in e else f" ({count} questions)" if count else ""
    print(f"  {e['title']} {e['split']} {main}: {shown.get(main, e.get(main))}{unit}{of}{extra}")
    for kind, acc in e.get("per_type", {}).items():
        print(f"    {kind:<24} {100 * acc:6.2f}%")


def cmd_demo(args: argparse.Namespace) -> int:
    from vlmkit.config import load_recipe
    from vlmkit.data.easyvqa import load_questions
    from vlmkit.inference.pipeline import VLMPipeline
    from vlmkit.training.run import run_training

    started = time.perf_counter()
    recipe = load_recipe("easyvqa-tiny", [f"train.output_dir={args.output_dir}", *args.overrides])
    summary = run_training(recipe)
    _print_summary(summary)
    print("  (a rerun on this machine with the same thread count and versions gives these digits exactly; on another\n"
          "   CPU the kernels round differently and the promise is the accuracy band of bench/demo_seeds.py: README)")
    pipe = VLMPipeline.from_pretrained(summary.model_dir)
    questions = [q for q in load_questions("test") if q.image_id == args.image_id]
    if not questions:
        raise ValueError(f"--image-id {args.image_id} is not an easy-VQA test image (valid: 0..999)")
    print(f"\nOne test image never seen in training: {questions[0].image_path}")
    for q in questions[: args.questions]:
        answer = pipe.chat(q.image_path, q.text, max_new_tokens=4)
        print(f"  Q: {q.text:<45} A: {answer:<10} (reference: {q.answer})")
    print(f"Chat with it in a browser or through the OpenAI client: vlmkit serve --model {summary.model_dir}")
    if not args.no_export:
        _demo_export(args)
    print(f"\ndemo wall time: {time.perf_counter() - started:.0f} s")
    return 0


#: the embedded recipe whose model transformers' LLaVA classes can hold (the demo model's BiT tower and
#: token merging cannot be expressed there)
EXPORT_RECIPE = "easyvqa-llava"


def _demo_export(args: argparse.Namespace) -> None:
    """The demo's second part: train the exportable recipe, export it as hf-llava, say how to serve it."""
    from vlmkit.config import load_recipe
    from vlmkit.recipes import recipe_description
    from vlmkit.training.run import run_training

    out = f"{args.output_dir.rstrip('/')}-llava"
    print(f"\nAn exportable model: {EXPORT_RECIPE}: {recipe_description(EXPORT_RECIPE)}")
    recipe = load_recipe(EXPORT_RECIPE, [f"train.output_dir={out}", "train.export=[hf-llava]", *args.overrides,
                                         *(args.export_override or [])])
    summary = run_training(recipe)
    _print_summary(summary)
    dst = summary.exports["hf-llava"]
    print("  " + SERVE_HINTS["hf-llava"].format(dst=dst).replace("\n", "\n  "))


def cmd_sweep(args: argparse.Namespace) -> int:
    from vlmkit.training.sweep import TABLE_HEADER, run_sweep, table_rows

    result = run_sweep(args.recipe, args.grid, args.overrides, args.output_dir)
    print(f"\nsweep folder: {result.output_dir}")
    print_table(TABLE_HEADER, table_rows(result.rows))
    print("  " + "  ".join(str(path) for path in result.files.values()))
    return 0


# ---------------------------------------------------------------------------------------------
# eval / chat

def cmd_eval(args: argparse.Namespace) -> int:
    """``vlmkit eval``; under ``torchrun --nproc-per-node N -m vlmkit eval ...`` the N processes share
    the questions (see :mod:`vlmkit.evaluation.runner`) and the main process prints."""
    import os

    from vlmkit import distributed
    from vlmkit.evaluation.judge import KEY_ENV_VARS, JudgeClient
    from vlmkit.evaluation.runner import EvalOptions, evaluate, headline, model_fingerprint, prepare
    from vlmkit.evaluation.tasks import TASKS
    from vlmkit.evaluation.tasks.base import resolve_data
    from vlmkit.inference.pipeline import VLMPipeline

    if distributed.launched():
        distributed.state()  # joins the process group before the first collective (in prepare)
    tasks = list(dict.fromkeys(TASKS.get(t).name for t in (args.tasks or ["easyvqa"])))
    judge = None
    if args.judge_url:
        if not args.judge_model:
            raise ValueError("--judge-url needs --judge-model (the model name the endpoint serves)")
        key = args.judge_key or next((os.environ[v] for v in KEY_ENV_VARS if os.environ.get(v)), None)
        judge = JudgeClient(args.judge_url, args.judge_model, key, retries=args.judge_retries)
    if not Path(args.model).is_dir():
        raise FileNotFoundError(f"--model {args.model}: no such model folder")
    options = EvalOptions(args.batch_size, args.limit, args.max_new_tokens, judge=judge, model_id=model_fingerprint(args.model))
    out = Path(args.out)
    runs = prepare(resolve_data(args.data, tasks, args.split), out, options)  # every file is checked before the model loads
    speaks = distributed.is_main()  # the other processes print nothing
    for run in runs:
        if run.done and speaks:
            ranks = len(run.log.rank_files())
            print(f"{run.spec.title}: resuming, {len(run.items) - len(run.todo)} of {len(run.items)} questions "
                  f"already answered in {run.log.path}" + (f" and {ranks} file(s) of an interrupted distributed run" if ranks else ""))
    device = args.device or (str(distributed.device()) if distributed.world_size() > 1 else None)
    pipe = VLMPipeline.from_pretrained(args.model, device=device, allow_pickle=args.allow_pickle)
    results = evaluate(pipe, runs, options, out)
    if not speaks:
        return 0
    for name, scores in results.items():
        if name == "easyvqa":
            print(f"easy-VQA {args.split or 'test'}: accuracy {100 * scores['accuracy']:.2f}% "
                  f"({scores['correct']}/{scores['total']}) -> {out}")
        else:
            shown = ", ".join(f"{metric} {value}" for metric, value in headline(name, scores))
            print(f"{TASKS.get(name).title}: {shown} ({scores.get('questions', scores.get('total', '?'))} questions) -> {out / name}")
    print(f"results table: {out / 'results.md'}")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from vlmkit.inference.chat import run_repl
    from vlmkit.inference.pipeline import VLMPipeline

    pipe = VLMPipeline.from_pretrained(args.model, device=args.device, allow_pickle=args.allow_pickle)
    settings = {"max_new_tokens": args.max_new_tokens, "use_cache": not args.no_cache, "seed": args.seed}
    if args.temperature > 0:
        settings.update(do_sample=True, temperature=args.temperature, top_p=args.top_p)
    if args.prompt:
        print(pipe.chat(args.image, " ".join(args.prompt), **settings))
        return 0
    return run_repl(pipe, args.image, settings)


def cmd_serve(args: argparse.Namespace) -> int:
    import importlib.util
    import os

    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"vlmkit serve: error: {' and '.join(missing)} not installed; install the serve extra: "
              "pip install 'vlmkit[serve]'", file=sys.stderr)
        return 2
    from vlmkit.inference.pipeline import VLMPipeline
    from vlmkit.serving import ServeOptions, serve

    api_key = args.api_key if args.api_key is not None else os.environ.get("VLMKIT_API_KEY") or None
    options = ServeOptions(
        model_name=args.model_name or Path(args.model).resolve().name, host=args.host, port=args.port, api_key=api_key,
        max_body_bytes=args.max_body_bytes, max_image_pixels=args.max_image_pixels,
        max_images_per_request=args.max_images_per_request, max_tokens=args.max_tokens, max_queued=args.max_queued,
        max_batch_size=args.max_batch_size, allow_remote_images=args.allow_remote_images,
        allowed_local_media_path=Path(args.allowed_local_media_path) if args.allowed_local_media_path else None,
    )
    pipe = VLMPipeline.from_pretrained(args.model, device=args.device, dtype=args.dtype, allow_pickle=args.allow_pickle)
    if options.host not in ("127.0.0.1", "localhost", "::1") and options.api_key is None:
        log.warning("listening on %s without an API key: anyone who can reach this port can use the model "
                    "(set --api-key or VLMKIT_API_KEY)", options.host)
    kind = "generates with continuous batching" if pipe.generative else "encoder-only: answers by classification"
    log.info("serving %s as model %r (%s) on http://%s:%d: web page at /, OpenAI API at /v1",
             args.model, options.model_name, kind, options.host, options.port)
    serve(pipe, options, log_level="debug" if args.verbose else "info")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from vlmkit.formats import export_model

    model, processor, cfg, what = _export_source(Path(args.src), args.stage, args.allow_pickle)
    dst = export_model(model, processor, cfg, args.format, args.dst)
    print(f"exported {what} as {args.format} -> {dst}")
    print(SERVE_HINTS.get(args.format, "").format(dst=dst))
    return 0


SERVE_HINTS = {
    "hf-llava": ("serve it with any engine that reads transformers LLaVA folders, e.g.\n"
                 "  vlmkit serve --model {dst}   (OpenAI API + a chat page at http://127.0.0.1:8000/)\n"
                 "  transformers serve {dst}   (OpenAI API: POST /v1/chat/completions, needs transformers[serving])\n"
                 "  vllm serve {dst}\n"
                 "or load it in Python: AutoModelForImageTextToText.from_pretrained('{dst}'), AutoProcessor.from_pretrained('{dst}')"),
    "hf-blip2": "load it with transformers: Blip2ForConditionalGeneration.from_pretrained('{dst}'), AutoProcessor.from_pretrained('{dst}')",
    "llava-original": "load it with the LLaVA repository's load_pretrained_model('{dst}', None, 'llava-v1.5') or vlmkit.load('{dst}')",
}


def _export_source(src: Path, stage: str | None, allow_pickle: bool):
    """``(model, processor, config, description)`` for ``vlmkit export SRC``: a model folder in any
    format, a run folder (its completed stages) or one stage folder of a run (stages up to it)."""
    from vlmkit.formats import load_any
    from vlmkit.training.run import restore_model

    if (src / "config.yaml").is_file():
        model, processor, cfg = restore_model(src, stage)
        return model, processor, cfg, f"run {src}" + (f" up to stage {stage!r}" if stage else "")
    if (src / "stage.json").is_file() and (src.parent.parent / "config.yaml").is_file():
        model, processor, cfg = restore_model(src.parent.parent, src.name)
        return model, processor, cfg, f"stage {src.name!r} of {src.parent.parent} (adapters merged)"
    if stage:
        raise ValueError(f"--stage needs a run folder; {src} is not one")
    loaded = load_any(src, allow_pickle=allow_pickle)
    return loaded.model, loaded.processor, loaded.config, f"{loaded.format} model {src}"


# ---------------------------------------------------------------------------------------------

PICKLE_HELP = ("read pickled weights (original LLaVA pytorch_model.bin, mm_projector.bin) with torch.load(weights_only=True); "
               "off: safetensors only")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmkit", description="Build, train, evaluate and chat with multimodal LLMs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every step, not only stage summaries")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="run (or resume) a recipe's stages", description="Run or resume a recipe: stages, final model, evaluation.")
    p.add_argument("recipe", help="shipped recipe name (vlmkit list recipes) or a YAML file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.seed=3 stages.instruct.lr=2e-4")
    p.add_argument("--stages", help="comma-separated stages to run; earlier ones must be complete")
    p.add_argument("--no-eval", action="store_true", help="skip the recipe's evaluation")
    p.add_argument("--allow-pickle", action="store_true", help=PICKLE_HELP)
    p.add_argument("--tiny-twin", action="store_true",
                   help="train the recipe's tiny twin instead: the same architecture kinds, stage policies and export formats, "
                        "with small random parts on easy-VQA for a few steps (a CPU check of the whole pipeline, into OUTPUT_DIR-twin)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="train the embedded easy-VQA model, evaluate it and answer a question",
                       description="Train easyvqa-tiny on easy-VQA (downloads nothing), evaluate on the 1,000-image test split, answer "
                                   f"questions; then train {EXPORT_RECIPE} (a model transformers' LLaVA can hold) and export it as hf-llava. "
                                   "Overrides apply to both recipes.")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the easyvqa-tiny recipe")
    p.add_argument("--output-dir", default="runs/easyvqa-tiny", help="run folder (default: %(default)s)")
    p.add_argument("--image-id", type=int, default=0, help="test image to ask about (default: %(default)s)")
    p.add_argument("--questions", type=int, default=4, help="how many of its questions to ask (default: %(default)s)")
    p.add_argument("--no-export", action="store_true",
                   help=f"skip the second part: training {EXPORT_RECIPE} and exporting it to the transformers LLaVA layout")
    p.add_argument("--export-override", action="append", metavar="KEY=VALUE",
                   help=f"a dotted override of the second part's recipe ({EXPORT_RECIPE}) only, applied after the shared "
                        "ones; repeat the option for several (e.g. a shorter schedule: --export-override stages.align.epochs=2)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("eval", help="evaluate a saved model on benchmarks",
                       description="Evaluate a saved model on one or more benchmarks. Predictions are saved per batch to "
                                   "OUT/TASK/predictions.jsonl, so running the same command again resumes; scores go to "
                                   "OUT/TASK/scores.json and OUT/results.md.")
    p.add_argument("--model", required=True, help="model folder (e.g. runs/easyvqa-tiny/model)")
    p.add_argument("--task", dest="tasks", action="append", metavar="NAME",
                   help="benchmark, repeatable: easyvqa (default), vqav2, textvqa, vizwiz, gqa, pope, mme, scienceqa, "
                        "mmbench, coco_caption, mmvet")
    p.add_argument("--data", action="append", default=[], metavar="[TASK[.FILE]=]PATH",
                   help="repeatable: TASK=FOLDER (or the task's main file), TASK.FILE=PATH for one file; a bare PATH "
                        "when there is one task. easy-VQA needs none (see README: Evaluation)")
    p.add_argument("--split", default=None, help="data split where a task has several (easyvqa, scienceqa, coco_caption; default: test)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--limit", type=int, default=None, help="only the first N questions of each task")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: per task (8 for short answers)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: where the model loads)")
    p.add_argument("--out", default="eval-out", help="output folder (default: %(default)s)")
    p.add_argument("--judge-url", default=None, help="OpenAI-compatible endpoint for judged tasks (mmvet), e.g. http://host:8000/v1")
    p.add_argument("--judge-model", default=None, help="the judge model name")
    p.add_argument("--judge-key", default=None, help="API key (default: $VLMKIT_JUDGE_KEY, then $OPENAI_API_KEY)")
    p.add_argument("--judge-retries", type=int, default=3, help="retries per judge request (default: %(default)s)")
    p.add_argument("--allow-pickle", action="store_true", help=PICKLE_HELP)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("chat", help="ask a saved model about an image", description="Answer a prompt about an image; an interactive session when no prompt is given.")
    p.add_argument("--model", required=True, help="model folder")
    p.add_argument("--image", default=None, help="image file")
    p.add_argument("prompt", nargs="*", help="the question; omit for an interactive session")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="> 0 samples; 0 is greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-cache", action="store_true", help="disable the KV cache (slower; for checks)")
    p.add_argument("--device", default=None)
    p.add_argument("--allow-pickle", action="store_true", help=PICKLE_HELP)
    p.set_defaults(func=cmd_chat)

    from vlmkit.serving.options import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_IMAGE_PIXELS, ServeOptions

    defaults = ServeOptions()
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API, with a web chat page",
                       description="Serve a model folder (any format vlmkit reads) at POST /v1/chat/completions (OpenAI "
                                   "shape, images as data: URLs, streaming), GET /v1/models and GET /health, and a web chat "
                                   "page at /. Concurrent requests share decode steps (continuous batching).")
    p.add_argument("--model", required=True, help="model folder (e.g. runs/easyvqa-tiny/model)")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the folder's name)")
    p.add_argument("--host", default=defaults.host, help="address to listen on (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=defaults.port, help="(default: %(default)s)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $VLMKIT_API_KEY; unset: no key)")
    p.add_argument("--max-queued", type=int, default=defaults.max_queued,
                   help="most requests waiting or generating at once; more get 429 (default: %(default)s)")
    p.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size,
                   help="most requests decoded together (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=defaults.max_tokens,
                   help="most tokens one answer may ask for, and the default (default: %(default)s)")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help="largest request body, base64 images included; larger get 413 (default: %(default)s)")
    p.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                   help="largest image (width x height), checked before decoding (default: %(default)s)")
    p.add_argument("--max-images-per-request", type=int, default=defaults.max_images_per_request,
                   help="(default: %(default)s)")
    p.add_argument("--allow-remote-images", action="store_true",
                   help="fetch http(s) image URLs (off: only data: URLs, and file:// with the next option)")
    p.add_argument("--allowed-local-media-path", default=None, metavar="DIR",
                   help="accept file:// image URLs of files inside DIR (no '..', no symlink out); off by default")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: where the model loads)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: as saved)")
    p.add_argument("--allow-pickle", action="store_true", help=PICKLE_HELP)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("export", help="write a model in another checkpoint format",
                       description="Write a model (a folder in any format vlmkit reads, a run folder, or a stage folder of a "
                                   "run: its LoRA adapters merged, trained connector and tower kept) in FORMAT to DST. DST is "
                                   "written completely or not at all; parts the format cannot express are refused by name, "
                                   "with the formats that can hold them.")
    p.add_argument("--format", required=True, help="hf-llava, hf-blip2, llava-original or vlmkit (vlmkit list formats)")
    p.add_argument("src", help="model folder, run folder or stage folder")
    p.add_argument("dst", help="new folder to write")
    p.add_argument("--stage", default=None, help="with a run folder: export the model after this stage")
    p.add_argument("--allow-pickle", action="store_true", help=PICKLE_HELP)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("sweep", help="train every combination of a grid of config choices and compare them",
                       description="Design-space sweep: train each variant of a grid (the cartesian product) in its own run "
                                   "folder, then print and save visual tokens, parameters, train time and eval accuracy "
                                   "(sweep.json, sweep.csv, sweep.png). Finished variants are not trained again. "
                                   "Before the first variant trains, every variant's model is built without weights (meta "
                                   "device) and all variants that cannot be built are reported at once. A variant that "
                                   "changes the connector type starts from that type's default options: the recipe's "
                                   "connector options (and connector weights) are dropped; options set on the command "
                                   "line or in the grid (merge=2, model.connector.options.KEY=V) always apply.")
    p.add_argument("recipe", help="shipped recipe name or a YAML file; it needs an eval section")
    p.add_argument("overrides", nargs="*", help="dotted overrides applied to every variant, e.g. stages.align.epochs=2")
    from vlmkit.training.sweep import GRID_ALIASES

    p.add_argument("--grid", action="append", required=True, metavar="KEY=V1,V2",
                   help=f"an axis of the grid (repeat, or several in one quoted argument); KEY is a dotted config key or "
                        f"an alias: {', '.join(GRID_ALIASES)} (lr sets every stage's lr; connector resets the recipe's "
                        "connector options when it changes the type)")
    p.add_argument("--output-dir", default=None, help="sweep folder; variants run in its subfolders (default: runs/<recipe name>-sweep)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("checkpoint", help="work with a run's resumable checkpoints",
                       description="consolidate: write a checkpoint (from any number of processes and any strategy, "
                                   "FSDP shards included) as an ordinary model folder, loadable and exportable.")
    csub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    c = csub.add_parser("consolidate", help="a checkpoint as a model folder",
                        description="Rebuild the run's model, load the checkpoint's trained tensors (LoRA merged) and save it "
                                    "as a vlmkit model folder. Default: the newest checkpoint of the latest stage that has one.")
    c.add_argument("run", help="run folder (train.output_dir)")
    c.add_argument("--stage", default=None, help="stage whose checkpoint to take (default: the latest with checkpoints)")
    c.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    c.add_argument("--output", default=None, help="new model folder (default: RUN/model-STAGE-step-N)")
    c.set_defaults(func=cmd_checkpoint)

    from vlmkit.planning import add_plan_parser

    add_plan_parser(sub)

    p = sub.add_parser("list", help="print what a registry holds", description="Print a registry.")
    p.add_argument("what", choices=sorted(LISTS), help="which registry")
    p.set_defaults(func=cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and (not hasattr(args, "overrides") or any(e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:  # overrides written after an option (`sweep R --grid a=1,2 x=1`): argparse leaves them over
        args.overrides += extra
    _setup_console_logging(args.verbose)
    from vlmkit.config import ConfigError
    from vlmkit.data.sources import DataError
    from vlmkit.registry import RegistryError
    from vlmkit.training.checkpoint import CheckpointError

    try:
        return args.func(args)
    except (ConfigError, DataError, RegistryError, CheckpointError, OSError, ValueError) as exc:  # OSError: names the path
        print(f"vlmkit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
