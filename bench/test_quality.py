"""The distribution of every trained-quality figure the test suite asserts, over seeds and kernel paths.

Runs the tests that call ``check_quality`` (``tests/conftest.py``) once per (seed, kernel path, thread
count) with ``VLMKIT_TEST_SEED`` / ``ATEN_CPU_CAPABILITY`` ... set and ``VLMKIT_QUALITY_LOG`` collecting
the figures, then prints, per figure: the number of runs, min / median / max, its bound and the margin
(how far the worst run stayed from the bound, as a fraction of the bound).

    python bench/test_quality.py                               # seeds 0-4 x kernels native,avx2,default x 2 threads
    python bench/test_quality.py --seeds 0-2 --kernels avx2 --threads 1,2 --log runs/quality.jsonl
    python bench/test_quality.py --summarize runs/quality.jsonl   # only print a log's table

The last line is ``worst margin: M (figure)``; a negative margin means some run broke its bound.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_seeds import KERNELS, parse_seeds  # noqa: E402

#: the test files whose tests assert trained quality
QUALITY_TESTS = ["tests/test_backbones.py", "tests/test_model.py", "tests/test_fusion.py", "tests/test_cli.py",
                 "tests/test_training.py::test_training_reduces_loss", "tests/test_demo.py"]


def margin(row: dict) -> float:
    """How far ``value`` is from its bound, relative to the bound (positive: inside)."""
    if row["below"] is not None:
        return (row["below"] - row["value"]) / abs(row["below"])
    return (row["value"] - row["above"]) / max(abs(row["above"]), 1e-9) if row["above"] else row["value"] - row["above"]


def summarize(rows: list[dict]) -> float:
    by_name: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_name[r["name"]].append(r)
    worst = (float("inf"), "")
    print(f"{'figure':<78} {'runs':>4} {'min':>8} {'median':>8} {'max':>8}  bound      margin")
    for name in sorted(by_name):
        group = by_name[name]
        values = [r["value"] for r in group]
        bound = f"< {group[0]['below']}" if group[0]["below"] is not None else f"> {group[0]['above']}"
        m = min(margin(r) for r in group)
        worst = min(worst, (m, name))
        print(f"{name[:78]:<78} {len(group):>4} {min(values):8.4f} {statistics.median(values):8.4f} {max(values):8.4f}  {bound:<9} {m:7.2f}")
    paths = sorted({(r["capability"], r["threads"]) for r in rows})
    seeds = sorted({r["seed"] for r in rows})
    print(f"seeds {seeds} x kernel paths / threads {paths}")
    print(f"worst margin: {worst[0]:.2f} ({worst[1]})")
    return worst[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0-4")
    parser.add_argument("--kernels", default="native,avx2,default", help=f"comma-separated, of {', '.join(KERNELS)}")
    parser.add_argument("--threads", default="2", help="comma-separated thread counts (default: %(default)s)")
    parser.add_argument("--log", default="runs/test-quality.jsonl", help="figures are appended here (default: %(default)s)")
    parser.add_argument("--summarize", metavar="LOG", help="print the table of an existing log and stop")
    parser.add_argument("tests", nargs="*", default=QUALITY_TESTS, help="test files / node ids (default: every quality test)")
    args = parser.parse_args(argv)
    if args.summarize:
        rows = [json.loads(line) for line in Path(args.summarize).read_text().splitlines() if line.strip()]
        return 0 if summarize(rows) > 0 else 1
    log = Path(args.log)
    log.parent.mkdir(parents=True, exist_ok=True)
    for kernel in args.kernels.split(","):
        for threads in args.threads.split(","):
            for seed in parse_seeds(args.seeds):
                env = {**os.environ, **KERNELS[kernel], "VLMKIT_TEST_SEED": str(seed), "VLMKIT_TEST_THREADS": threads,
                       "VLMKIT_QUALITY_LOG": str(log.resolve())}
                done = subprocess.run([sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-p", "no:cacheprovider", "-p", "no:warnings", *args.tests],
                                      env=env, capture_output=True, text=True)
                tail = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-300:]
                print(f"kernel {kernel}, {threads} thread(s), seed {seed}: {tail}", flush=True)
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return 0 if summarize(rows) > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
