"""Run vlmkit under ``torchrun`` and with injected faults, for tests/test_distributed.py.

``python tests/launch_helpers.py jobs JOBS.json`` (under torchrun): run each job of the file in this
one launch, so the start-up (interpreter, torch, process group) is paid once. A job is
``{"argv": [...], "env": {...}}`` (``vlmkit.cli.main(argv)``; its exit code is recorded) or
``{"recipe": ..., "overrides": [...], "stop_after": N}`` (``run_training`` stopped after N steps).
Rank 0 writes ``{"job name": exit code}`` to ``JOBS.json.result``. A job with ``"record_loading": true``
also has every process record how it built the run's first model: ``{"meta": built without weights,
"reads": transformers from_pretrained calls}`` in ``JOBS.json.loading.rank<r>``.

``python tests/launch_helpers.py faults [--kill-at-checkpoint N] [--step-delay S] -- vlmkit args``:
``vlmkit.cli.main`` with SIGKILL sent to itself while writing its N-th checkpoint (after the tensors,
before the folder is renamed into place), or a pause after every optimizer step (so a test can signal
the process mid-stage).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time


def run_jobs(path: str) -> int:
    from vlmkit import distributed
    from vlmkit.cli import main
    from vlmkit.config import load_recipe
    from vlmkit.training.run import run_training
    from vlmkit.training.trainer import TrainingInterrupted

    distributed.state()
    results, loading = {}, {}
    for name, job in json.loads(open(path).read()).items():
        saved = {k: os.environ.get(k) for k in job.get("env", {})}
        os.environ.update(job.get("env", {}))
        restore = _record_loading(loading.setdefault(name, {})) if job.get("record_loading") else None
        try:
            if "argv" in job:
                results[name] = main(job["argv"])
            else:
                try:
                    run_training(load_recipe(job["recipe"], job["overrides"]), stop_after=job["stop_after"], evaluate=False)
                    results[name] = 0
                except TrainingInterrupted:
                    results[name] = "stopped"
        finally:
            if restore is not None:
                restore()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        distributed.barrier()
    if distributed.is_main():
        with open(path + ".result", "w") as fh:
            json.dump(results, fh)
    with open(f"{path}.loading.rank{distributed.rank()}", "w") as fh:
        json.dump(loading, fh)
    return 0


def _record_loading(record: dict):
    """Count ``from_pretrained`` calls and note whether ``first_model`` built without weights, into
    ``record``; returns the function that undoes the patches."""
    import transformers

    import vlmkit.training.run as run
    from vlmkit.training.materialize import has_meta

    record["reads"] = 0
    original_first, original_load = run.first_model, transformers.PreTrainedModel.from_pretrained.__func__

    def first_model(*args, **kwargs):
        built = original_first(*args, **kwargs)
        record["meta"] = has_meta(built[0])
        return built

    def from_pretrained(cls, *args, **kwargs):
        record["reads"] += 1
        return original_load(cls, *args, **kwargs)

    run.first_model = first_model
    transformers.PreTrainedModel.from_pretrained = classmethod(from_pretrained)

    def restore():
        run.first_model = original_first
        transformers.PreTrainedModel.from_pretrained = classmethod(original_load)

    return restore


def run_with_faults(args: list[str]) -> int:
    import vlmkit.training.checkpoint as checkpoint
    import vlmkit.training.strategies as strategies
    from vlmkit.cli import main

    split = args.index("--")
    options, argv = args[:split], args[split + 1 :]
    if "--kill-at-checkpoint" in options:
        target = int(options[options.index("--kill-at-checkpoint") + 1])
        original, calls = checkpoint._rng_state, [0]

        def rng_state_then_die():
            calls[0] += 1
            if calls[0] == target:
                os.kill(os.getpid(), signal.SIGKILL)
            return original()

        checkpoint._rng_state = rng_state_then_die
    if "--step-delay" in options:
        delay = float(options[options.index("--step-delay") + 1])
        step = strategies.Strategy.step

        def slow_step(self, max_grad_norm):
            out = step(self, max_grad_norm)
            time.sleep(delay)
            return out

        strategies.Strategy.step = slow_step
    return main(argv)


if __name__ == "__main__":
    command, rest = sys.argv[1], sys.argv[2:]
    sys.exit(run_jobs(rest[0]) if command == "jobs" else run_with_faults(rest))
