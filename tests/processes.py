"""Child processes for the multi-process tests: a free port, a clean environment, and a run that
kills its whole process group (launcher and workers) when it outlives its timeout."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

#: variables a parent launcher may have set; a child launched by a test starts its own world
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               CUDA_VISIBLE_DEVICES="")
    return env


def start(cmd: list[str]) -> subprocess.Popen:
    """``cmd`` in its own session (so it and its children can be killed together); output captured."""
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, env=child_env())


def finish(proc: subprocess.Popen, timeout: float) -> subprocess.CompletedProcess:
    """Wait for ``proc``; on timeout kill its process group and fail with the end of its output."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{' '.join(map(str, proc.args))} did not finish in {timeout} s:\n{out[-2000:]}\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    return finish(start(cmd), timeout)


def torchrun(args: list[str], nproc: int = 2, timeout: float = 600) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node NPROC ARGS`` on the CPU (gloo), ``ARGS`` e.g. ``-m vlmkit eval ...``."""
    return run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
                "--master-port", str(free_port()), *args], timeout)
