"""The heartbeat watchdog's judgement, on a store in a dict and a clock the test moves: who counts
as silent, when, and who does not (a rank that left on purpose, rank 0 that finished and took its
store along, this process's own pause). The real thing runs in tests/engine/test_distributed.py."""

from __future__ import annotations

import pytest

from relex_merge.common.errors import RelexError
from relex_merge.engine import watchdog
from relex_merge.engine.watchdog import Watchdog


class _Store:
    def __init__(self):
        self.data: dict[str, str] = {}

    def set(self, key, value):
        self.data[key] = value

    def multi_get(self, keys):
        return [self.data[k].encode() for k in keys]


def _dog(monkeypatch, rank=0, world=3, store_host=0, limit=10.0):
    clock = [100.0]
    monkeypatch.setattr(watchdog.time, "monotonic", lambda: clock[0])
    store = _Store()
    dogs = [Watchdog(store, r, world, limit, store_host) for r in range(world)]
    for dog in dogs:
        dog.host = f"node{dog.rank}"
        dog.announce()
    dogs[rank]._read([f"relex-heartbeat/{r}" for r in dogs[rank].peers])
    return dogs[rank], store, clock


def test_a_rank_whose_heartbeat_stops_is_silent_after_the_limit(monkeypatch):
    dog, store, clock = _dog(monkeypatch)
    keys = [f"relex-heartbeat/{r}" for r in dog.peers]
    for beat in range(1, 5):  # ranks 1 and 2 beat for 8 s, then rank 2 stops
        clock[0] += 2
        store.set("relex-heartbeat/1", f"{beat} node1")
        store.set("relex-heartbeat/2", f"{min(beat, 1)} node2")
        dog._read(keys)
    assert dog.silent(clock[0]) == []  # rank 2's last beat moved 6 s ago
    clock[0] += 5
    store.set("relex-heartbeat/1", "5 node1")
    dog._read(keys)
    assert dog.silent(clock[0]) == [(2, "node2", 11.0)]
    assert dog.message(dog.silent(clock[0])) == (
        "rank 2 of 3 (node2) stopped answering 11 s ago (killed or hung); stopping every rank"
    )


def test_a_rank_that_left_is_not_silent(monkeypatch):
    dog, store, clock = _dog(monkeypatch)
    store.set("relex-heartbeat/1", "done node1")
    store.set("relex-heartbeat/2", "done node2")
    dog._read([f"relex-heartbeat/{r}" for r in dog.peers])
    clock[0] += 60
    dog.contact = clock[0]
    assert dog.silent(clock[0]) == []


def test_a_store_that_stops_answering_names_its_host_unless_it_finished(monkeypatch):
    dog, store, clock = _dog(monkeypatch, rank=1)
    clock[0] += 11  # no round trip with the store for 11 s: rank 0, which hosts it, is gone
    assert dog.silent(clock[0]) == [(0, "node0", 11.0)]
    store.set("relex-heartbeat/0", "done node0")  # rank 0 finished before the store went away
    dog._read([f"relex-heartbeat/{r}" for r in dog.peers])
    clock[0] += 11
    assert dog.silent(clock[0]) == [] and dog.closing.is_set()


def test_torchruns_store_is_named_as_such(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "node9")
    dog, store, clock = _dog(monkeypatch, store_host=None)
    clock[0] += 11
    assert dog.message(dog.silent(clock[0])).startswith("torchrun's store at node9 stopped answering 11 s ago")


def test_this_process_own_pause_is_not_blamed_on_the_others(monkeypatch):
    """Stopped itself (or starved of the GIL) for longer than the limit, a rank first gives the
    heartbeats a round: its own silence is not the others'."""
    dog, store, clock = _dog(monkeypatch)
    clock[0] += 30
    dog.awake = clock[0]  # what _judge records when its own tick came late
    clock[0] += 1
    assert dog.silent(clock[0]) == []
    dog._read([f"relex-heartbeat/{r}" for r in dog.peers])  # the store answers; the peers' beats do not move
    clock[0] += 10
    assert [rank for rank, _, _ in dog.silent(clock[0])] == [1, 2]
    assert "rank 1 of 3 (node1) and 1 more rank(s) stopped answering 11 s ago" in dog.message(dog.silent(clock[0]))


@pytest.mark.parametrize("text,limit", [("", 60.0), ("5", 5.0), (" 2.5 ", 2.5)])
def test_the_limit_comes_from_the_environment(monkeypatch, text, limit):
    monkeypatch.setenv("RELEX_RANK_SILENCE_LIMIT", text)
    assert watchdog.limit_from_env() == limit


@pytest.mark.parametrize("text", ["0", "-3", "soon", "inf", "nan"])
def test_a_bad_limit_is_one_line(monkeypatch, text):
    monkeypatch.setenv("RELEX_RANK_SILENCE_LIMIT", text)
    with pytest.raises(RelexError, match=r"^RELEX_RANK_SILENCE_LIMIT: expected seconds > 0, got"):
        watchdog.limit_from_env()


def test_the_store_host_waits_for_its_peers_before_taking_the_store_along(monkeypatch):
    """Under srun rank 0 hosts the store: leaving first, it made a peer still finishing report it."""
    dog, store, clock = _dog(monkeypatch)
    reads, finish_at = [], [3]

    def multi_get(keys):
        reads.append(keys)
        if len(reads) == finish_at[0]:  # the peers finish while rank 0 waits
            store.set("relex-heartbeat/1", "done node1")
            store.set("relex-heartbeat/2", "done node2")
        return [store.data[k].encode() for k in keys]

    store.multi_get = multi_get
    monkeypatch.setattr(watchdog.time, "sleep", lambda s: None)
    dog._wait_for_peers_to_leave()
    assert len(reads) == 3  # returned at the first reading where every peer was done
    reads.clear()
    finish_at[0] = 0
    store.set("relex-heartbeat/1", "7 node1")  # a peer that never leaves: bounded by the limit
    monkeypatch.setattr(watchdog.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    dog._wait_for_peers_to_leave()
    assert 10 <= 0.2 * len(reads) <= 10.5


def test_after_a_failed_collective_a_peer_that_left_is_named_at_once(monkeypatch):
    dog, store, clock = _dog(monkeypatch)
    monkeypatch.setattr(watchdog.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    assert dog.wait_for_verdict() is None  # nobody left: waited the limit and two beats
    assert clock[0] == pytest.approx(100.0 + 10 + 2 * dog.interval, abs=0.3)
    store.set("relex-heartbeat/2", "done node2")
    dog._read([f"relex-heartbeat/{r}" for r in dog.peers])
    assert dog.wait_for_verdict() == 2


def test_one_failed_heartbeat_does_not_silence_a_rank_for_good():
    import threading

    class Flaky(_Store):
        calls = 0

        def set(self, key, value):
            Flaky.calls += 1
            if Flaky.calls == 1:
                raise RuntimeError("connection reset")
            super().set(key, value)

    store = Flaky()
    dog = Watchdog(store, 1, 2, 0.05, 0)
    store.data["relex-heartbeat/0"] = "0 node0"
    thread = threading.Thread(target=dog._beat)
    thread.start()
    threading.Event().wait(0.2)
    dog.closing.set()
    thread.join()
    assert store.data["relex-heartbeat/1"].startswith("done")
    assert Flaky.calls > 3  # it kept beating after the first failure
