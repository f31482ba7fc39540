"""Starting the processes: from torchrun's environment, or spawned on this machine (``--nproc``).

Both paths end in the same ``setup()``: the standard ``env://`` rendezvous of torch.distributed
(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK), the gloo backend on CPU and NCCL on
GPUs, and a finite timeout, so that a rank waiting for a dead or stuck peer stops with an error
instead of hanging.

Spawned processes never outlive the launcher: each holds the reading end of a pipe whose only
writer is the launcher, and stops itself (SIGKILL, so that it writes nothing more) the moment the
pipe closes, which the kernel does when the launcher dies, however it dies. On Linux the kernel
also kills them when their parent (the fork server, which exits with the launcher) dies.
"""

from __future__ import annotations

import ctypes
import datetime
import os
import signal
import socket
import sys
import threading
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DEFAULT_TIMEOUT = 60.0  # seconds a rank waits for a peer before giving up
RENDEZVOUS_TIMEOUT = 300.0  # seconds spawned processes may take to start and meet
_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class ProcessFailure(RuntimeError):
    """One or more of the processes started by :func:`spawn` failed (the message names them)."""


def default_backend() -> str:
    """NCCL when this process has a GPU and NCCL is built in, gloo otherwise."""
    if torch.cuda.is_available() and dist.is_nccl_available():
        return "nccl"
    return "gloo"


def launched() -> bool:
    """True when this process was started by torchrun or :func:`spawn` (the env vars are set)."""
    return all(name in os.environ for name in _ENV)


def setup(
    backend: str | None = None, timeout: float = DEFAULT_TIMEOUT, store: dist.Store | None = None
) -> torch.device:
    """Join the process group described by the environment; return this rank's device.

    Args:
        backend: "gloo", "nccl" or None for :func:`default_backend`.
        timeout: seconds any communication may wait for a peer before failing.
        store: the rendezvous store; by default the ``env://`` one (torchrun's).
    """
    missing = [name for name in _ENV if name not in os.environ]
    if missing:
        raise RuntimeError(
            f"environment variable(s) {', '.join(missing)} not set: start the processes with "
            "torchrun or sdfa.distributed.spawn (sdfa train --nproc N)"
        )
    if timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds; got {timeout}")
    backend = backend or default_backend()
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    options = {"store": store, "rank": int(os.environ["RANK"])} if store else {}
    dist.init_process_group(
        backend,
        world_size=int(os.environ["WORLD_SIZE"]),
        timeout=datetime.timedelta(seconds=timeout),
        **options,
    )
    return device


def is_main_process() -> bool:
    """True in a single process, and on rank 0 of a process group (the one that reports)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(fn, nproc: int, args: tuple = (), *, backend: str | None = None,
          timeout: float = DEFAULT_TIMEOUT) -> None:
    """Run ``fn(*args)`` in ``nproc`` new processes that form one process group on this machine.

    Each process is set up like a torchrun worker (:func:`setup` has been called when ``fn``
    starts). If a process fails, the others are given ``timeout`` seconds to notice and stop on
    their own (each prints its own error); then this raises :class:`ProcessFailure`, which names
    every failed rank. ``fn`` and ``args`` must be picklable (a module-level function).
    """
    if not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be a positive integer; got {nproc!r}")
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(nproc)}
    ctx = _context()
    errors = ctx.SimpleQueue()
    lifeline, held = ctx.Pipe(duplex=False)  # only this process holds the writing end
    procs = [
        ctx.Process(target=_worker, args=(rank, env, backend, timeout, fn, args, errors, lifeline))
        for rank in range(nproc)
    ]
    for proc in procs:
        proc.start()
    lifeline.close()
    deadline = None
    while any(p.is_alive() for p in procs):
        if deadline is None and any(p.exitcode not in (None, 0) for p in procs):
            deadline = time.monotonic() + timeout + 1
        if deadline is not None and time.monotonic() > deadline:
            for p in procs:
                if p.is_alive():
                    p.kill()
        time.sleep(0.05)
    for p in procs:
        p.join()
    held.close()
    messages = {}
    while not errors.empty():
        rank, message = errors.get()
        messages[rank] = message
    failed = [(rank, p.exitcode) for rank, p in enumerate(procs) if p.exitcode != 0]
    if failed:
        lines = [f"rank {r}: {messages.get(r) or _describe_exit(code)}" for r, code in failed]
        raise ProcessFailure(f"{len(failed)} of {nproc} processes failed:\n" + "\n".join(lines))


def _context():
    """Fresh processes; from a fork server that has imported torch once, where there is one."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    # torch's first backward pass imports symbolic_shapes (and sympy): seconds, once per server.
    ctx.set_forkserver_preload(["torch", "torch.fx.experimental.symbolic_shapes", __package__])
    return ctx


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def _stop_with_launcher(lifeline) -> None:
    """Kill this process when the launcher dies (see the module docstring)."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)
    threading.Thread(target=_watch, args=(lifeline,), name="launcher-watch", daemon=True).start()


def _watch(lifeline) -> None:
    try:
        lifeline.recv_bytes()  # the launcher never sends: this returns when the pipe closes
    except (EOFError, OSError):
        pass
    os.kill(os.getpid(), signal.SIGKILL)


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _worker(rank, env, backend, timeout, fn, args, errors, lifeline):
    _stop_with_launcher(lifeline)
    os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank))
    try:
        # Our own store, so that slow process start-up does not count against ``timeout``.
        store = dist.TCPStore(
            env["MASTER_ADDR"], int(env["MASTER_PORT"]), int(env["WORLD_SIZE"]),
            is_master=rank == 0, timeout=datetime.timedelta(seconds=RENDEZVOUS_TIMEOUT),
        )
        setup(backend, timeout, store)
        fn(*args)
    except BaseException as err:  # report, then exit non-zero
        traceback.print_exc()
        errors.put((rank, f"{type(err).__name__}: {err}"))
        sys.stdout.flush()
        os._exit(1)
    finally:
        teardown()
