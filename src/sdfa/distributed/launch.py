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

import contextlib
import ctypes
import datetime
import os
import pickle
import re
import signal
import socket
import sys
import threading
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .comm import PeerFailure

DEFAULT_TIMEOUT = 60.0  # seconds a rank waits for a peer before giving up
RENDEZVOUS_TIMEOUT = 300.0  # seconds spawned processes may take to start and meet
_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


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
    rank, world_size = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    _env_int("MASTER_PORT", 0, 65535)
    if rank >= world_size:
        raise ValueError(f"RANK {rank} is out of range for WORLD_SIZE {world_size}")
    backend = backend or default_backend()
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    options = {"store": store, "rank": rank} if store else {}
    with rendezvous(timeout):
        dist.init_process_group(
            backend, world_size=world_size, timeout=datetime.timedelta(seconds=timeout), **options
        )
    return device


def _env_int(name: str, low: int, high: int | None = None) -> int:
    value = os.environ[name]
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or number < low or (high is not None and number > high):
        bounds = f"from {low} to {high}" if high is not None else f">= {low}"
        raise ValueError(f"environment variable {name} must be an integer {bounds}; got {value!r}")
    return number


@contextlib.contextmanager
def rendezvous(timeout: float):
    """Turn a failure to meet the other ranks at MASTER_ADDR:MASTER_PORT into one line that says
    where and what to do: a ValueError for a port in use (a setting to change), a
    :class:`PeerFailure` for ranks that never joined or a rank 0 that cannot be reached."""
    try:
        yield
    except (dist.DistNetworkError, dist.DistStoreError) as error:
        raise _rendezvous_error(error, timeout) from None


def _rendezvous_error(error: Exception, timeout: float) -> Exception:
    env = os.environ
    address = f"{env['MASTER_ADDR']}:{env['MASTER_PORT']} (MASTER_ADDR:MASTER_PORT)"
    rank, world_size = env["RANK"], env["WORLD_SIZE"]
    text = str(error).strip().splitlines()[0]
    if "EADDRINUSE" in text or "address already in use" in text.lower():
        return ValueError(
            f"rank {rank} cannot host the rendezvous at {address}: the port is in use by "
            "another program. Choose a free port (torchrun --master-port PORT, or set "
            "MASTER_PORT) or stop the program that holds it"
        )
    if isinstance(error, dist.DistStoreError):
        joined = re.search(r"(\d+)/(\d+) clients joined", text)
        who = f"only {joined[1]} of {joined[2]}" if joined else "not all"
        return PeerFailure(
            f"rank {rank} of {world_size}: {who} processes joined the rendezvous at {address} "
            f"within {timeout:g} s. Start all {world_size} processes with the same MASTER_ADDR, "
            "MASTER_PORT and WORLD_SIZE (or raise peer_timeout if they start slowly)"
        )
    detail = "" if "connect" in text else f" ({text})"
    return PeerFailure(
        f"rank {rank} of {world_size}: cannot reach the rendezvous at {address} within "
        f"{timeout:g} s{detail}. Start rank 0, which hosts it, or check MASTER_ADDR, "
        "MASTER_PORT and that no firewall blocks the port"
    )


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
    every failed rank. When every failed rank raised the same ValueError (bad settings or data,
    found alike by each), that ValueError is raised instead, once. ``fn`` and ``args`` must be
    picklable (a module-level function).
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
    reports = {}
    while not errors.empty():
        rank, *report = errors.get()
        reports[rank] = report
    failure = _failure(nproc, [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0],
                       reports)
    if failure is not None:
        raise failure from None


def _failure(nproc: int, failed: list[tuple[int, int]], reports: dict) -> Exception | None:
    """What ``spawn`` raises for the failed ``(rank, exit code)``s, given each rank's report
    ``(message, portable ValueError or None, lost a peer)``.

    A rank that lost a peer (its rendezvous or a message broke because another rank stopped)
    failed as a consequence: when every other failed rank raised the same ValueError (bad
    settings or data), that error is the cause, raised once."""
    causes = [r for r, _ in failed if not reports.get(r, (None, None, False))[2]]
    raised = [reports[r][1] if r in reports else None for r in causes]
    if raised and None not in raised and len({str(e) for e in raised}) == 1:
        return raised[0]  # every rank that stopped on its own found the same bad input
    if failed:
        lines = [f"rank {r}: {reports[r][0] if r in reports else _describe_exit(code)}"
                 for r, code in failed]
        return ProcessFailure(f"{len(failed)} of {nproc} processes failed:\n" + "\n".join(lines))
    return None


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


def _worker(rank, env, backend, timeout, fn, args, errors, lifeline):
    _stop_with_launcher(lifeline)
    os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank))
    try:
        # Our own store, so that slow process start-up does not count against ``timeout``.
        with rendezvous(RENDEZVOUS_TIMEOUT):
            store = dist.TCPStore(
                env["MASTER_ADDR"], int(env["MASTER_PORT"]), int(env["WORLD_SIZE"]),
                is_master=rank == 0, timeout=datetime.timedelta(seconds=RENDEZVOUS_TIMEOUT),
            )
        setup(backend, timeout, store)
        fn(*args)
    except BaseException as err:  # report, then exit non-zero
        bad_input = _portable(err) if isinstance(err, ValueError) else None
        if bad_input is None:  # bad settings or data are one line, which the launcher prints
            traceback.print_exc()
        errors.put((rank, f"{type(err).__name__}: {err}", bad_input, isinstance(err, PeerFailure)))
        sys.stdout.flush()
        os._exit(1)
    finally:
        teardown()


def _portable(error: Exception) -> Exception | None:
    """``error`` if it survives pickling (to be raised again by the launcher), else None."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return None
    return error
