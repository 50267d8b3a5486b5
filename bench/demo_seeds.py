"""Robustness of the demo recipe: train it for several seeds (optionally on another kernel path) and
report the spread of its test accuracy.

Each seed is an ordinary run of ``vlmkit train RECIPE train.seed=S`` in its own folder, started as a
fresh process so that the kernel-path variables take effect (PyTorch reads them at import):

    python bench/demo_seeds.py                              # seeds 0-4, this machine's default kernels
    python bench/demo_seeds.py --seeds 0-4 --kernel avx2    # ATEN_CPU_CAPABILITY=avx2 (+ oneDNN/MKL capped to AVX2)
    python bench/demo_seeds.py --seeds 0,3 --threads 1 --env MKL_ENABLE_INSTRUCTIONS=AVX2 stages.instruct.epochs=4

A finished seed (its folder holds ``eval.json`` of the same config) is read back, not trained again;
``--force`` retrains. One line per seed with its accuracy, per-type accuracies and train time, then
the kernel path the runs used, and as the last line ``accuracy min / median / max: A / B / C``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

#: --kernel NAME -> environment for PyTorch's CPU kernels (ATen dispatch, oneDNN, MKL)
KERNELS: dict[str, dict[str, str]] = {
    "native": {},
    "default": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "MKL_ENABLE_INSTRUCTIONS": "AVX512"},
}


def parse_seeds(text: str) -> list[int]:
    """``0-4`` or ``0,2,5`` (or a mix: ``0-2,7``)."""
    seeds: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        seeds += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    if not seeds:
        raise SystemExit(f"--seeds {text!r}: no seeds")
    return seeds


def capability(env: dict[str, str]) -> str:
    """The CPU capability PyTorch reports under ``env`` (what the runs actually used)."""
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.strip()


def run_seed(recipe: str, seed: int, folder: Path, threads: int, overrides: list[str], env: dict[str, str], force: bool) -> dict:
    """Train (or read back) one seed; returns its ``eval.json`` plus the stages' train seconds."""
    if force and folder.exists():
        import shutil

        shutil.rmtree(folder)
    args = [sys.executable, "-m", "vlmkit", "train", recipe, f"train.seed={seed}", f"train.output_dir={folder}",
            f"train.threads={threads}", "train.progress=false", *overrides]
    if not (folder / "eval.json").is_file():
        started = time.perf_counter()
        done = subprocess.run(args, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"seed {seed} failed ({' '.join(args)}):\n{done.stderr[-3000:]}")
        wall = time.perf_counter() - started
    else:
        wall = float("nan")
    record = json.loads((folder / "eval.json").read_text())
    stages = [json.loads(p.read_text()) for p in sorted((folder / "stages").glob("*/stage.json"))]
    record["train_seconds"] = sum(s.get("seconds", 0.0) for s in stages)
    record["wall_seconds"] = wall
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="dotted recipe overrides applied to every seed")
    parser.add_argument("--recipe", default="easyvqa-tiny")
    parser.add_argument("--seeds", default="0-4", help="e.g. 0-4 or 0,3,7 (default: %(default)s)")
    parser.add_argument("--kernel", choices=sorted(KERNELS), default="native",
                        help="kernel path: native (as the machine picks), default, avx2, avx512 (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run (default: %(default)s)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="more environment for the runs")
    parser.add_argument("--output-dir", default=None, help="default: runs/seeds-<recipe>-<kernel>-t<threads>")
    parser.add_argument("--force", action="store_true", help="retrain seeds that already have results")
    args = parser.parse_args(argv)

    env = {**os.environ, **KERNELS[args.kernel]}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--env {item!r}: write KEY=VALUE")
        env[key] = value
    out = Path(args.output_dir or f"runs/seeds-{args.recipe}-{args.kernel}-t{args.threads}")
    used = capability(env)
    print(f"recipe {args.recipe}, kernel path {args.kernel} (torch CPU capability {used}), {args.threads} thread(s), "
          f"overrides: {' '.join(args.overrides) or '-'}")
    accuracies = []
    for seed in parse_seeds(args.seeds):
        r = run_seed(args.recipe, seed, out / f"seed-{seed}", args.threads, args.overrides, env, args.force)
        accuracies.append(100 * r["accuracy"])
        types = "  ".join(f"{k} {100 * v:.2f}" for k, v in r.get("per_type", {}).items())
        print(f"seed {seed}: {r['title']} {r['split']} accuracy {100 * r['accuracy']:.2f}%  [{types}]  "
              f"train {r['train_seconds']:.0f} s, wall {r['wall_seconds']:.0f} s", flush=True)
    print(f"accuracy min / median / max: {min(accuracies):.2f} / {statistics.median(accuracies):.2f} / {max(accuracies):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
