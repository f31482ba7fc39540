"""The one place where sdfa talks to torch.distributed: every tensor it moves is counted here.

``Comm`` wraps the point-to-point and collective calls that layer-parallel training makes, so
that (1) the bytes per step can be measured from what actually went through torch.distributed
(not estimated), and (2) a failed call, because a peer died, hung past the process-group timeout
or cannot be reached, becomes one clear :class:`PeerFailure` instead of a backend traceback.

Counting rule: every transfer is counted once on the receiving rank, under a label that says what
it carried ("activations", "gradients", "error"). A broadcast counts its payload on each rank
other than the root, whatever algorithm the backend uses (tree or ring): that is the least any
broadcast must deliver. Summed over ranks, the received bytes are the bytes the step moved.
Objects exchanged for checkpoints (:meth:`gather_object`) are not training traffic and are not
counted. :func:`bytes_written` cross-checks the count from outside: what the process actually
wrote to its sockets (gloo on Linux).
"""

from __future__ import annotations

import contextlib
import re
from collections import Counter

import torch
import torch.distributed as dist

RESUME_HINT = "resume from the last checkpoint (sdfa train ... --resume)"


class PeerFailure(RuntimeError):
    """Communication with another rank failed: it died, hung past the timeout or is unreachable."""


class Comm:
    """Counted, failure-checked send / recv / broadcast on the default process group."""

    def __init__(self):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "torch.distributed is not initialized: start the processes with torchrun or "
                "sdfa.distributed.spawn, and call sdfa.distributed.setup() in each"
            )
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.received: Counter[str] = Counter()

    def reset(self) -> None:
        """Forget the bytes counted so far (e.g. at the start of the step to measure)."""
        self.received.clear()

    @contextlib.contextmanager
    def guard(self, what: str, *, only_backend_errors: bool = False):
        """Turn a communication error raised inside the block into a :class:`PeerFailure`.

        Around a bare communication call every RuntimeError is one; around a whole step (a DDP
        backward pass) pass ``only_backend_errors=True`` to let the model's own errors through.
        """
        try:
            yield
        except PeerFailure:
            raise
        except RuntimeError as err:  # gloo / NCCL errors, torch.distributed.DistError included
            if only_backend_errors and not _backend_error(err):
                raise
            raise PeerFailure(
                f"rank {self.rank} of {self.world_size}: {what} failed ({err}). Another rank "
                "probably died, hung past the process-group timeout or cannot be reached; this "
                f"rank stops too. Fix the cause and {RESUME_HINT}."
            ) from err

    def recv(self, tensor: torch.Tensor, src: int, label: str) -> torch.Tensor:
        with self.guard(f"receiving {label} from rank {src}"):
            dist.recv(tensor, src)
        self.received[label] += _nbytes(tensor)
        return tensor

    def isend(self, tensor: torch.Tensor, dst: int, label: str) -> _Pending:
        """Start sending; call ``wait()`` on the result before ``tensor`` changes."""
        what = f"sending {label} to rank {dst}"
        with self.guard(what):
            return _Pending(dist.isend(tensor, dst), tensor, self, what)

    def broadcast(self, tensor: torch.Tensor, src: int, label: str) -> torch.Tensor:
        with self.guard(f"broadcast of the {label} from rank {src}"):
            dist.broadcast(tensor, src)
        if self.rank != src:
            self.received[label] += _nbytes(tensor)
        return tensor

    def all_reduce(self, tensor: torch.Tensor, label: str) -> torch.Tensor:
        """Sum ``tensor`` over all ranks in place; counts the reduced tensor each rank receives."""
        with self.guard(f"all-reduce of the {label}"):
            dist.all_reduce(tensor)
        self.received[label] += _nbytes(tensor)
        return tensor

    def gather_object(self, obj, dst: int = 0, what: str = "gathering the checkpoint"):
        """Gather a picklable object from every rank: a list on ``dst``, None elsewhere."""
        out = [None] * self.world_size if self.rank == dst else None
        with self.guard(what):
            dist.gather_object(obj, out, dst=dst)
        return out

    def total(self, label: str | None = None) -> int:
        """Bytes received by *all* ranks (collective: every rank must call it)."""
        mine = sum(self.received.values()) if label is None else self.received[label]
        value = torch.tensor([mine], dtype=torch.float64, device=_device())
        with self.guard("summing the byte counters"):
            dist.all_reduce(value)
        return int(value.item())


def bytes_written() -> int | None:
    """Bytes this process has written so far through write()/writev() (Linux: wchar of
    /proc/self/io), or None where the kernel does not report it.

    gloo's TCP transport writes every message that way, so over a step with no file or terminal
    output, the difference summed over the ranks is what the step put on the wire: the bytes
    :class:`Comm` counts plus gloo's message headers. (NCCL moves data without these calls.)
    """
    try:
        with open("/proc/self/io") as io:
            fields = dict(line.split(": ") for line in io.read().splitlines())
    except OSError:
        return None
    return int(fields["wchar"])


class _Pending:
    def __init__(self, work, tensor: torch.Tensor, comm: Comm, what: str):
        self.work, self.tensor, self.comm, self.what = work, tensor, comm, what  # keep tensor alive

    def wait(self) -> None:
        with self.comm.guard(self.what):
            self.work.wait()


def _backend_error(err: RuntimeError) -> bool:
    return isinstance(err, dist.DistError) or bool(_BACKEND_MESSAGE.search(str(err)))


_BACKEND_MESSAGE = re.compile(r"gloo|nccl|connection|timed out|timeout", re.IGNORECASE)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
