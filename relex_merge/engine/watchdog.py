"""Notice a rank that was killed without a word (SIGKILL, a lost node) or froze, within a bounded
time, and name it. Without this the other ranks wait in a gloo collective until ``--timeout``.

Every rank writes a heartbeat (a counter) into the launcher's key-value store (torch's TCPStore:
torchrun's agent or, under srun, rank 0 hosts it) every few seconds from a daemon thread, and
reads everyone else's. A rank whose counter has not moved for ``limit`` seconds, or a store that
stopped answering (its host, rank 0, is gone), ends every other rank: the lowest live rank
prints one line naming it, and each exits with ``EXIT_CODE`` through ``os._exit``, since the main
thread may be blocked in a collective that nothing can interrupt.

A thread's heartbeat proves the process is alive and scheduled, not that the merge is moving: a
rank that loops forever in Python still beats (``--timeout`` bounds that), and a rank that works
alone for long (rank 0 scoring a sweep) is not mistaken for a dead one.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from relex_merge.common.errors import RelexError

__all__ = ["DEFAULT_LIMIT", "ENV_LIMIT", "EXIT_CODE", "Watchdog", "limit_from_env", "store_client"]

log = logging.getLogger(__name__)

DEFAULT_LIMIT = 60.0  # seconds without a heartbeat before a rank counts as killed or hung
ENV_LIMIT = "RELEX_RANK_SILENCE_LIMIT"  # an environment variable reaches every rank under any launcher
EXIT_CODE = 1
_DONE = "done"  # a rank that left on purpose (finished, or failed after every rank agreed)


def limit_from_env() -> float:
    """The silence limit: ``RELEX_RANK_SILENCE_LIMIT`` seconds, or ``DEFAULT_LIMIT``."""
    text = os.environ.get(ENV_LIMIT, "").strip()
    if not text:
        return DEFAULT_LIMIT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise RelexError(f"{ENV_LIMIT}: expected seconds > 0, got {text!r}")
    return value


class Watchdog:
    """This rank's heartbeat and the check of every other rank's (``start`` ... ``close``).

    ``store``: a store client of its own (a clone: the heartbeat must not share a connection with
    gloo's); ``store_host``: the rank that hosts the store (0 under srun), None when a launcher
    process does (torchrun's agent)."""

    def __init__(self, store: Any, rank: int, world_size: int, limit: float, store_host: int | None):
        self.store, self.rank, self.world_size, self.limit = store, rank, world_size, limit
        self.store_host = store_host
        self.interval = min(5.0, limit / 5)  # a few beats per limit; rare enough to cost nothing
        self.host = socket.gethostname()
        self.peers = [r for r in range(world_size) if r != rank]
        now = time.monotonic()
        self.seen: dict[int, tuple[str, float]] = {r: ("", now) for r in self.peers}  # value, when it last moved
        self.contact = now  # the last round trip with the store
        self.awake = now  # when this process last resumed after being starved or stopped itself
        self.closing = threading.Event()
        self.cleanups: list[Callable[[], None]] = []
        self._threads: list[threading.Thread] = []

    def wait_for_verdict(self) -> int | None:
        """After a collective failed: wait until the judge ends this process (a rank died or
        froze) or a peer is seen to have left on purpose (returned: it failed alone and left;
        there is nobody to wait for), at most ``limit`` and two beats."""
        deadline = time.monotonic() + self.limit + 2 * self.interval
        while time.monotonic() < deadline and not self.closing.is_set():
            left = [peer for peer, (value, _) in self.seen.items() if value.startswith(_DONE)]
            if left:
                return left[0]
            time.sleep(0.25)
        return None

    def _key(self, rank: int) -> str:
        return f"relex-heartbeat/{rank}"

    def announce(self) -> None:
        """Write the first heartbeat (before a barrier: then every key exists before anyone reads)."""
        self.store.set(self._key(self.rank), f"0 {self.host}")

    def start(self) -> None:
        """Start beating and watching (daemon threads: they never keep the process alive). Call
        once every rank has announced itself: the first reading names every peer's host."""
        self._read([self._key(r) for r in self.peers])
        for target in (self._beat, self._judge):
            thread = threading.Thread(target=target, name=f"relex-{target.__name__[1:]}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def close(self) -> None:
        """Stop, leaving a mark that this rank left on purpose (peers still finishing do not
        report it); never waits long on a store that stopped answering."""
        self.closing.set()
        for thread in self._threads:
            thread.join(timeout=self.interval + 1)
        if self.rank == self.store_host and self._threads:
            self._wait_for_peers_to_leave()

    def _wait_for_peers_to_leave(self) -> None:
        """The store's host (rank 0 under srun) takes the store along when it exits: a peer still
        finishing would find it gone and report rank 0. So it waits, at most ``limit`` seconds,
        until every peer has marked itself done."""
        keys = [self._key(r) for r in self.peers]
        deadline = time.monotonic() + self.limit
        with contextlib.suppress(Exception):
            while time.monotonic() < deadline:
                if all(v.decode().startswith(_DONE) for v in self.store.multi_get(keys)):
                    return
                time.sleep(0.2)

    def _beat(self) -> None:
        keys = [self._key(r) for r in self.peers]
        count = 0
        while not self.closing.wait(self.interval):
            count += 1
            try:
                self.store.set(self._key(self.rank), f"{count} {self.host}")
                self._read(keys)
            except Exception:  # noqa: BLE001 - the judge counts the silence; a passing fault heals
                log.debug("heartbeat: the store did not answer", exc_info=True)
        with contextlib.suppress(Exception):
            self.store.set(self._key(self.rank), f"{_DONE} {self.host}")

    def _read(self, keys: list[str]) -> None:
        values = [v.decode() for v in self.store.multi_get(keys)]
        now = time.monotonic()
        for peer, value in zip(self.peers, values):
            if value != self.seen[peer][0]:
                self.seen[peer] = (value, now)
        self.contact = now

    def _judge(self) -> None:
        tick = time.monotonic()
        while not self.closing.wait(self.interval / 2):
            now = time.monotonic()
            if now - tick > 2 * self.interval:
                self.awake = now  # this process was starved or stopped: give the heartbeats a round first
            tick = now
            silent = self.silent(now)
            if silent:
                self._stop_everyone(silent, now)

    def silent(self, now: float) -> list[tuple[int, str, float]]:
        """The ranks that stopped answering: (rank, host, seconds since their last sign of life)."""

        def quiet_for(since: float) -> float:
            return now - max(since, self.awake)

        if quiet_for(self.contact) > self.limit:  # the store itself is gone
            if self.store_host is None:
                return [(-1, os.environ.get("MASTER_ADDR", "?"), quiet_for(self.contact))]
            value = self.seen.get(self.store_host, ("", 0.0))[0]
            if value.startswith(_DONE):  # rank 0 finished and took its store along: not a failure
                self.closing.set()
                return []
            host = _host(value) if value else os.environ.get("MASTER_ADDR", "?")
            return [(self.store_host, host, quiet_for(self.contact))]
        return [
            (peer, _host(value), quiet_for(since))
            for peer, (value, since) in self.seen.items()
            if not value.startswith(_DONE) and quiet_for(since) > self.limit
        ]

    def message(self, silent: list[tuple[int, str, float]]) -> str:
        """The one line, e.g. ``rank 2 of 3 (node7) stopped answering 60 s ago (killed or hung)``."""
        rank, host, ago = silent[0]
        more = f" and {len(silent) - 1} more rank(s)" if len(silent) > 1 else ""
        who = f"torchrun's store at {host}" if rank < 0 else f"rank {rank} of {self.world_size} ({host}){more}"
        return f"{who} stopped answering {ago:.0f} s ago (killed or hung); stopping every rank"

    def _stop_everyone(self, silent: list[tuple[int, str, float]], now: float) -> None:
        alive = sorted(set(range(self.world_size)) - {rank for rank, _, _ in silent})
        if alive and alive[0] == self.rank:  # one line for the whole run, from the lowest live rank
            sys.stderr.write(f"error: {self.message(silent)}\n")
        else:
            # the reporter notices within a beat or two; were this rank to exit first, the launcher
            # could stop the reporter (SIGTERM) before it names the silent rank
            time.sleep(2 * self.interval + 1)
        for cleanup in reversed(self.cleanups):
            with contextlib.suppress(Exception):
                cleanup()
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(EXIT_CODE)  # the main thread may be blocked in gloo: nothing else would end it


def _host(value: str) -> str:
    return value.partition(" ")[2] or "?"  # a heartbeat reads "COUNT HOST" or "done HOST"


def store_client(limit: float) -> tuple[Any, int | None]:
    """A client of its own to the default group's store, and the rank hosting it (None: the
    launcher's agent does, as under torchrun)."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=limit)
    try:
        store = dist.distributed_c10d._get_default_store().clone()  # a new connection, for this thread only
    except (AttributeError, RuntimeError):  # an older torch cannot clone: a client of the same store
        client = dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, wait_for_workers=False
        )
        store = dist.PrefixStore(f"relex/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", client)
    store.set_timeout(timeout)
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    return store, (None if agent else 0)
