"""One merge across several processes (torchrun, srun): who this process is, and the few
collectives a merge needs. Tensors are independent, so ranks only meet to agree that every
step succeeded, to exchange small results (Gram matrices, diagnostics) and to wait for the
output files' headers; the tensor bytes go straight to the shared output files.

A single process is a group of one, so the merge code is the same either way:

    group = process_group.current()
    with group.step("reading the window"):     # every rank reaches the end; any failure fails all
        ...
    stats = group.all_gather(stats)

Launchers: ``torchrun`` sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT; ``srun`` sets
SLURM_PROCID/SLURM_STEP_NUM_TASKS/SLURM_LOCALID and the job script exports MASTER_ADDR/MASTER_PORT.
The collectives are tiny, so gloo serves CPU and GPU runs alike. A rank killed without a word
or frozen is noticed within ``RELEX_RANK_SILENCE_LIMIT`` seconds (default 60) by watchdog.py.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from relex_merge.common.errors import RelexError, exit_code, one_line
from relex_merge.engine import watchdog

__all__ = ["DEFAULT_TIMEOUT", "Group", "RankFailure", "current", "join", "launcher_environment", "leave"]

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 1800.0  # seconds a rank waits for the others in one collective


class RankFailure(RelexError):
    """Another rank failed; this rank stops too (it prints nothing: rank 0 reports)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class _Status:
    rank: int
    host: str
    message: str | None  # None: this rank's step succeeded
    exit_code: int = 0


class Group:
    """The processes running one merge. This base class is the single-process group."""

    rank = 0
    world_size = 1
    local_rank = 0

    @property
    def distributed(self) -> bool:
        """Several ranks (torchrun/srun); False for the single-process group."""
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """Rank 0: it creates and finalises the output, and talks to the user."""
        return self.rank == 0

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        return [obj]

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        return obj

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        """Run the body on every rank, then agree: if any rank failed, every rank raises (the
        rank that failed re-raises its own error; the others raise RankFailure naming it)."""
        error: BaseException | None = None
        try:
            yield
        except BaseException as exc:  # noqa: BLE001 - the others must learn of any failure
            error = exc
        self._agree(what, error)
        if error is not None:
            raise error

    def _agree(self, what: str, error: BaseException | None) -> None:
        if not self.distributed:
            return
        status = _Status(self.rank, socket.gethostname(), None if error is None else one_line(error), exit_code(error))
        failed = [s for s in self.all_gather(status) if s.message is not None]
        if failed:
            log.debug("%s: failed on rank(s) %s", what, ", ".join(str(s.rank) for s in failed))
        else:
            log.debug("%s: done on every rank", what)
        if not failed or error is not None:
            return
        first = failed[0]
        more = f" (and {len(failed) - 1} more rank(s))" if len(failed) > 1 else ""
        raise RankFailure(
            f"rank {first.rank} of {self.world_size} ({first.host}): {first.message}{more}", first.exit_code or 1
        )

    @contextlib.contextmanager
    def cleanup_if_stopped(self, cleanup: Callable[[], None]) -> Iterator[None]:
        """Run ``cleanup`` (say, remove the partial output) if the watchdog ends this process
        while the body runs: its exit skips every ``finally``."""
        dog = _WATCHDOG
        if dog is None:
            yield
            return
        dog.cleanups.append(cleanup)
        try:
            yield
        finally:
            dog.cleanups.remove(cleanup)

    def describe_failure(self, error: BaseException) -> str:
        """The line rank 0 prints for its own failure (ranks are named in distributed runs)."""
        if self.distributed and not isinstance(error, RankFailure):
            return f"rank {self.rank} of {self.world_size} ({socket.gethostname()}): {one_line(error)}"
        return one_line(error)


class TorchGroup(Group):
    """Every rank of torch.distributed's default process group (gloo)."""

    def __init__(self, rank: int, world_size: int, local_rank: int):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank

    def all_gather(self, obj: Any) -> list[Any]:
        """``Group.all_gather`` through torch.distributed (pickled objects)."""
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        with _lost_peers():
            dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """``Group.broadcast`` through torch.distributed (a pickled object from rank 0)."""
        import torch.distributed as dist

        box = [obj if self.main else None]
        with _lost_peers():
            dist.broadcast_object_list(box, src=0)
        return box[0]


@contextlib.contextmanager
def _lost_peers() -> Iterator[None]:
    """A collective that failed (gloo saw a peer's connection close: it was killed) waits for
    the watchdog to name that rank; failing that, one line instead of gloo's message."""
    try:
        yield
    except RuntimeError as exc:
        left = _WATCHDOG.wait_for_verdict() if _WATCHDOG is not None else None  # or it ends the process
        who = f"rank {left} left the run early; " if left is not None else ""
        raise RelexError(f"lost contact with the other ranks: {who}{str(exc).splitlines()[0][:300]}") from exc


_CURRENT: Group = Group()
_WATCHDOG: watchdog.Watchdog | None = None


def current() -> Group:
    """The group this process belongs to (a group of one unless ``join`` found a launcher)."""
    return _CURRENT


def launcher_environment() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) from torchrun's or srun's variables; None when alone.

    SLURM: only srun's per-step SLURM_STEP_NUM_TASKS counts. The job-wide SLURM_NTASKS (and
    SLURM_PROCID=0) are also set in the sbatch script itself, where a plain ``relex-merge`` is
    one process and would wait for peers that never start."""
    env = os.environ
    if int(env.get("WORLD_SIZE", "1")) > 1:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0"))
    if int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1 and "SLURM_PROCID" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"]), int(env.get("SLURM_LOCALID", "0"))
    return None


def join(timeout: float = DEFAULT_TIMEOUT) -> Group:
    """Join the launcher's process group (gloo) if this process was started by torchrun or srun
    with several ranks; otherwise stay a group of one."""
    global _CURRENT, _WATCHDOG
    if _CURRENT.distributed:
        return _CURRENT
    found = launcher_environment()
    if found is None:
        return _CURRENT
    rank, world, local = found
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise RelexError(
            f"distributed run (rank {rank} of {world}): set {' and '.join(missing)} to rank 0's host and a free "
            "port (torchrun sets them; under srun, export them in the job script: see docs/distributed.md)"
        )
    limit = watchdog.limit_from_env()
    import torch.distributed as dist

    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world))
    os.environ.setdefault("LOCAL_RANK", str(local))
    log.debug("joining the process group: rank %d of %d (local %d)", rank, world, local)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout))
    _CURRENT = TorchGroup(rank, world, local)
    store, store_host = watchdog.store_client(limit)
    _WATCHDOG = watchdog.Watchdog(store, rank, world, limit, store_host)
    _WATCHDOG.announce()
    dist.barrier()  # every rank's first heartbeat is in the store before anyone reads them
    _WATCHDOG.start()
    return _CURRENT


def leave() -> None:
    """Leave the process group (at the end of a distributed command)."""
    global _CURRENT, _WATCHDOG
    if _WATCHDOG is not None:
        _WATCHDOG.close()  # first: a finished rank must not look dead to the others
        _WATCHDOG = None
    if _CURRENT.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    _CURRENT = Group()
