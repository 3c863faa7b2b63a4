"""Launch N localhost JAX processes (jax.distributed over gloo) for multi-process tests."""

import os
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
from tiny import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_workers(argv: Sequence[str], log_prefix: str, num_processes: int, local_devices: int,
                timeout_s: float, extra_env: Optional[Dict[str, str]] = None) -> float:
    """Run ``python *argv`` in ``num_processes`` processes that find each other through the
    ``GFN_JAX_*`` variables, each with ``local_devices`` CPU devices; logs go to
    ``{log_prefix}{pid}.log``. Kills stragglers after ``timeout_s``; asserts every process
    exited 0 (showing its log otherwise). Returns the elapsed seconds."""
    port = free_port()
    procs: List[subprocess.Popen] = []
    logs = []
    start = time.time()
    try:
        for pid in range(num_processes):
            env = dict(os.environ)
            for k in ("SLURM_JOB_ID", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "OMPI_COMM_WORLD_SIZE"):
                env.pop(k, None)
            env.update(
                XLA_FLAGS=xla_flags(local_devices, num_processes),
                JAX_PLATFORMS="cpu",
                PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""),
                GFN_JAX_COORDINATOR=f"localhost:{port}",
                GFN_JAX_NUM_PROCESSES=str(num_processes),
                GFN_JAX_PROCESS_ID=str(pid),
                **(extra_env or {}),
            )
            log = open(f"{log_prefix}{pid}.log", "w")
            logs.append(log)
            procs.append(subprocess.Popen([sys.executable, *argv], env=env, stdout=log,
                                          stderr=subprocess.STDOUT, cwd=ROOT))
        for p in procs:
            p.wait(timeout=max(1.0, timeout_s - (time.time() - start)))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
        for log in logs:
            log.close()
    elapsed = time.time() - start
    for pid, p in enumerate(procs):
        with open(f"{log_prefix}{pid}.log") as f:
            text = f.read()
        assert p.returncode == 0, f"worker {pid} rc={p.returncode} after {elapsed:.0f}s:\n{text[-4000:]}"
    return elapsed


class ThreadGather:
    """``process_allgather`` for hosts simulated by threads: stacks every host's array."""

    def __init__(self, n: int, timeout_s: float = 60.0) -> None:
        self.n, self.slots = n, [None] * n
        self.barrier = threading.Barrier(n, timeout=timeout_s)

    def for_host(self, h: int):
        def gather(x):
            self.slots[h] = x
            self.barrier.wait()
            out = np.stack(self.slots)
            self.barrier.wait()
            return out
        return gather


def run_in_threads(fn: Callable[[int], Any], gather: ThreadGather,
                   timeout_s: float = 60.0) -> List[Any]:
    """``[fn(h) for each simulated host h]``, the hosts run in threads sharing ``gather``; a
    host's exception is raised here (the barrier is broken so the others stop too)."""
    out: List[Any] = [None] * gather.n
    errors: List[BaseException] = []

    def host(h: int) -> None:
        try:
            out[h] = fn(h)
        except BaseException as e:  # noqa: BLE001 - re-raised below, in the test's thread
            errors.append(e)
            gather.barrier.abort()

    threads = [threading.Thread(target=host, args=(h,), daemon=True) for h in range(gather.n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    if errors:
        raise errors[0]
    assert all(o is not None for o in out), "a host thread did not finish"
    return out
