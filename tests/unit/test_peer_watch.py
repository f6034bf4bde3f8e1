"""trainer.distributed.PeerWatch names the ranks that did not come to a collective, from the signs of life each
rank writes into the launcher's store: a rank whose beats stopped, a rank that beats but is at an earlier step,
and, when every rank beats at the same step, that one is stuck inside it. A real TCPStore on 127.0.0.1 stands in
for the launcher's; the other ranks' records are written here, as their beat threads would."""
from __future__ import annotations

import socket
import threading
from datetime import timedelta

import pytest
import torch.distributed as dist

from trainer.distributed import PeerLost, PeerWatch, is_peer_failure

INTERVAL_S = 0.2


@pytest.fixture
def store(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    return server


def beating(store, rank: int, step: int) -> threading.Event:
    """Rank `rank`'s beat thread, at `step`, until the returned event is set."""
    stop = threading.Event()

    def beat():
        beats = 0
        while not stop.is_set():
            beats += 1
            store.set(f"{PeerWatch.PREFIX}{rank}", f"{beats} {step}")
            stop.wait(INTERVAL_S / 2)

    threading.Thread(target=beat, daemon=True).start()
    return stop


def test_a_silent_rank_and_a_rank_behind_are_named_apart(store):
    watch = PeerWatch(rank=0, world=4, interval_s=INTERVAL_S)
    watch.step = 5
    store.set(f"{PeerWatch.PREFIX}1", "7 5")  # wrote once at step 5, then nothing: frozen or gone
    behind = beating(store, 2, 3)  # alive, two steps back
    try:
        said = watch.missing()
    finally:
        behind.set()
        watch.close()
    assert said == ("no sign of life from rank 1 (last seen at step 5), rank 3 (never seen); "
                    "alive but behind: rank 2 at step 3")


def test_every_rank_alive_at_the_same_step_means_one_is_stuck_inside_it(store):
    watch = PeerWatch(rank=1, world=2, interval_s=INTERVAL_S)
    watch.step = 4
    alive = beating(store, 0, 4)
    try:
        said = watch.missing()
    finally:
        alive.set()
        watch.close()
    assert said == "every rank is alive and has begun step 4: one is stuck inside it"


def test_a_store_that_does_not_answer_is_said_to_be_gone(store, monkeypatch):
    watch = PeerWatch(rank=1, world=2, interval_s=INTERVAL_S)
    monkeypatch.setattr(watch, "_records", lambda: None)  # every read timed out
    try:
        said = watch.missing()
    finally:
        watch.close()
    assert said.startswith("the store at 127.0.0.1:") and said.endswith("is frozen or gone")


def test_only_a_peer_failure_becomes_a_one_line_stop():
    assert is_peer_failure(RuntimeError("[gloo/unbound_buffer.cc:78] Timed out waiting 3000ms for recv operation"))
    assert is_peer_failure(RuntimeError("[gloo/pair.cc:534] Connection closed by peer [127.0.0.1]:4242"))
    assert not is_peer_failure(RuntimeError("CUDA out of memory"))
    assert not is_peer_failure(ValueError("Timed out"))  # not a collective's error
    assert PeerLost.exit_code == 3
