"""Where this process stands in a distributed run, and the few collectives vlmkit needs.

Launchers (``torchrun``, ``accelerate launch``, MPI) describe the run through environment variables;
accelerate's :class:`~accelerate.PartialState` reads them and initialises the process group (NCCL on
GPUs, gloo on CPUs). A plain ``python``/``vlmkit`` call is a world of one, and every function here is
then a cheap no-op, so the same code runs with and without a launcher.

Rules the rest of vlmkit follows: every file is written by the main process (:func:`is_main`) while
the others wait (:func:`barrier`); a decision that may fail (a config check, a free-space check) is
taken once and shared (:func:`agree`), so that no process is left waiting in a collective for one that
raised.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

T = TypeVar("T")

#: environment variables a launcher sets for every process
LAUNCH_ENV = ("WORLD_SIZE", "LOCAL_RANK")


def launched() -> bool:
    """Whether a launcher started this process as one of several (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def state():
    """accelerate's process state (initialises the process group on first use when launched).

    On machines without CUDA the state is created with ``cpu=True``: accelerate then uses gloo across
    CPU processes instead of treating every process as a lone one (which would train the same batches
    on each, the bug of ``vlmkit`` before 0.2)."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def ensure_process_group() -> None:
    """A process group even for a plain one-process call (FSDP and DeepSpeed need one): a local gloo
    (or NCCL) group of one on a free port. No-op when one exists."""
    if initialized():
        return
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        os.environ.setdefault(key, value)
    torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    """Processes in the run (1 without a launcher)."""
    return torch.distributed.get_world_size() if initialized() else 1


def rank() -> int:
    """This process's global rank (0 without a launcher)."""
    return torch.distributed.get_rank() if initialized() else 0


def local_world_size() -> int:
    """Processes on this node (``LOCAL_WORLD_SIZE`` from the launcher; the world size otherwise)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))


def node_cpus() -> int:
    """CPUs this process may run on (its affinity mask; ``os.cpu_count()`` where there is none)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def threads_per_process(requested: int) -> int:
    """``requested`` torch CPU threads, capped at this node's CPUs shared by its processes (at least 1).

    OpenMP threads that outnumber the cores do not just share them: an idle worker spins at its barrier
    and takes the core another process computes on (two easy-VQA runs of 2 threads each on 2 cores
    ran 15x slower than one). ``torchrun`` sets ``OMP_NUM_THREADS=1`` for that reason; a recipe's
    ``train.threads`` goes through this cap.
    """
    return max(1, min(requested, node_cpus() // max(1, local_world_size())))


def is_main() -> bool:
    """Whether this is the process that writes files and logs progress."""
    return rank() == 0


def device() -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` on GPU machines, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def barrier() -> None:
    """Wait until every process gets here."""
    if initialized():
        torch.distributed.barrier()


def all_reduce_sum(values: list[float], dev: torch.device | None = None) -> list[float]:
    """Element-wise sums of ``values`` over all processes (float64 on the wire)."""
    if not initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=dev or _collective_device())
    torch.distributed.all_reduce(t)
    return t.tolist()


def all_reduce_max(values: list[float]) -> list[float]:
    """Element-wise maxima of ``values`` over all processes."""
    if not initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.tolist()


def broadcast_object(obj: T, src: int = 0) -> T:
    """``obj`` of process ``src`` on every process (picklable values made by vlmkit itself)."""
    if not initialized():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src, device=_collective_device())
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order, on every process."""
    if not initialized():
        return [obj]
    out: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def agree(check: Callable[[], T]) -> T:
    """Run ``check`` on the main process and give its result to all; if it raised there, raise the
    same exception (type and message) on every process, so none waits in a collective for it.

    Exceptions must be constructible from one message string (``ValueError``, ``ConfigError``, ...)."""
    if not initialized():
        return check()
    outcome: tuple[str, Any]
    if is_main():
        try:
            outcome = ("ok", check())
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every process
            outcome = ("error", (type(exc), str(exc)))
    else:
        outcome = ("", None)
    kind, value = broadcast_object(outcome)
    if kind == "error":
        cls, message = value
        raise cls(message)
    return value


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is true on at least one process."""
    return bool(all_reduce_max([float(flag)])[0])


@contextlib.contextmanager
def main_first() -> Iterator[bool]:
    """The main process runs the body first (writing what the others then read); yields ``is_main()``."""
    if not is_main():
        barrier()
    try:
        yield is_main()
    finally:
        if is_main():
            barrier()


def _collective_device() -> torch.device:
    # NCCL moves only CUDA tensors; gloo only CPU ones
    backend = torch.distributed.get_backend() if initialized() else "gloo"
    return device() if "nccl" in str(backend) else torch.device("cpu")
