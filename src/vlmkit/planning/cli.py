"""``vlmkit plan RECIPE [overrides] --gpus N --gpu-memory 80GB ...``: the command line of the planner."""

from __future__ import annotations

import argparse
import re

from vlmkit.config import STRATEGIES, ConfigError

_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT])(i?)[bB]?\s*$")
_SCALE = {"k": 1, "m": 2, "g": 3, "t": 4}


def parse_memory(text: str, option: str = "--gpu-memory") -> int:
    """Bytes of a memory size: ``80GB`` (decimal), ``80GiB`` (binary), ``24G`` (= GB), ``40000MB``.

    Raises:
        ConfigError: not a number with a unit; names ``option`` and the accepted forms.
    """
    match = _MEMORY.match(str(text))
    if not match:
        raise ConfigError(f"{option}={text!r} is not a memory size; write a number and a unit: 80GB, 80GiB, 24G, 40000MB, 1.5TB")
    value, unit, binary = float(match.group(1)), match.group(2).lower(), bool(match.group(3))
    size = int(value * (1024 if binary else 1000) ** _SCALE[unit])
    if size <= 0:
        raise ConfigError(f"{option}={text!r} must be more than zero")
    return size


def add_plan_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``plan`` to a ``vlmkit`` subcommand parser (``func=cmd_plan``)."""
    p = subparsers.add_parser(
        "plan", help="per-device memory and FLOPs of a recipe on given GPUs (downloads nothing)",
        description="Estimate, per stage, what one GPU holds (weights, LoRA adapters, gradients, optimizer states by "
                    "strategy and ZeRO stage, activations with and without activation checkpointing) and the FLOPs of "
                    "a step; say whether it fits and what to change. The model is built on the meta device and one "
                    "micro-batch is traced on fake tensors: nothing is downloaded or allocated.")
    p.add_argument("recipe", help="shipped recipe name (vlmkit list recipes) or a YAML file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.gradient_checkpointing=true")
    p.add_argument("--gpus", type=int, default=1, help="GPUs over all nodes, one process each (default: %(default)s)")
    p.add_argument("--gpu-memory", default="80GB",
                   help="memory per GPU: 80GB, 80GiB, 24G, 40000MB (default: %(default)s; an '80GB' A100/H100 holds 80GiB)")
    p.add_argument("--nodes", type=int, default=1, help="machines the GPUs are spread over (default: %(default)s)")
    p.add_argument("--cpu-memory", default=None, help="host memory per node, to check offloading (e.g. 1TB)")
    p.add_argument("--strategy", default=None, help=f"override train.strategy: {', '.join(STRATEGIES)}")
    p.add_argument("--deepspeed", default=None,
                   help="override train.deepspeed (implies --strategy deepspeed): zero2, zero3, zero3-offload or a JSON file")
    p.add_argument("--micro-batch", type=int, default=None, help="samples per GPU per forward (every stage's micro_batch_size)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sample, visual tokens included (default: model.max_length)")
    p.add_argument("--label-fraction", type=float, default=1.0,
                   help="share of text positions that carry labels (default: 1.0, every one; the upper bound)")
    p.add_argument("--images-per-sample", type=int, default=1, help="images in each sample (default: %(default)s)")
    p.add_argument("--answer-len", type=int, default=128,
                   help="encoder-decoder language models (Flan-T5): decoder tokens per sample, the answer; --seq-len "
                        "is then the encoder's input (default: %(default)s)")
    p.add_argument("--answers", type=int, default=None,
                   help="encoder-only language models (RoBERTa) without model.answers: size of the answer vocabulary "
                        "(default: 3129, VQAv2's usual one)")
    p.add_argument("--stage", dest="stages", action="append", default=None, metavar="NAME", help="plan only this stage (repeatable)")
    p.add_argument("--no-compare", action="store_true",
                   help="skip the column with the other activation-checkpointing setting (one trace less per stage)")
    p.set_defaults(func=cmd_plan)
    return p


def cmd_plan(args: argparse.Namespace) -> int:
    """Print the plan; exit status 0 when every stage fits, 1 when one does not.

    Raises:
        ConfigError: a bad option, recipe or override (the message names it and what is valid).
    """
    from vlmkit.planning.plan import PlanOptions, plan_recipe
    from vlmkit.planning.report import format_plan

    if args.strategy is not None and args.strategy not in STRATEGIES:
        raise ConfigError(f"--strategy={args.strategy!r} is not valid; choose one of {', '.join(STRATEGIES)}")
    options = PlanOptions(
        gpus=args.gpus, gpu_memory=parse_memory(args.gpu_memory), nodes=args.nodes,
        cpu_memory=parse_memory(args.cpu_memory, "--cpu-memory") if args.cpu_memory else None,
        strategy=args.strategy, deepspeed=args.deepspeed, micro_batch=args.micro_batch, seq_len=args.seq_len,
        label_fraction=args.label_fraction, images_per_sample=args.images_per_sample, stages=args.stages,
        compare_checkpointing=not args.no_compare, answer_len=args.answer_len,
        **({"answers": args.answers} if args.answers is not None else {}),
    )
    plan = plan_recipe(args.recipe, list(args.overrides or []), options)
    print(format_plan(plan))
    return 0 if plan.fits else 1
