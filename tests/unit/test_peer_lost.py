"""A collective that fails because a peer died or went silent becomes one line naming what was lost."""

from __future__ import annotations

from engine import ds


def test_a_closed_connection_names_the_host_and_its_ranks(monkeypatch):
    monkeypatch.setattr(ds, "_hosts", ["10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.2"])
    err = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [10.0.0.2]:40123. This is "
                       "typically caused by a remote worker crashing.")
    lost = ds.peer_lost(err, step=7)
    assert isinstance(lost, ds.PeerLost) and lost.exit_code == 3
    assert "lost host 10.0.0.2 (rank 2, 3) at step 7: its connection closed" in str(lost)
    assert "relaunch the same command to resume from the latest complete checkpoint" in str(lost)


def test_a_reset_connection_names_the_remote_end(monkeypatch):
    monkeypatch.setattr(ds, "_hosts", ["10.0.0.1", "10.0.0.2"])
    err = RuntimeError("[../gloo/transport/tcp/pair.cc:534] Read error [10.0.0.2]:41414: Connection reset by peer")
    assert "lost host 10.0.0.2 (rank 1) at step 2" in str(ds.peer_lost(err, step=2))


TIMED_OUT = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 30000ms for recv operation")


def test_a_silent_host_is_named_by_the_roll_call_after_the_timeout(monkeypatch):
    monkeypatch.setattr(ds, "_hosts", ["10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.2"])
    text = str(ds.peer_lost(TIMED_OUT, step=4, roll_call=lambda step: [2, 3]))
    assert ("lost host 10.0.0.2 (rank 2, 3) at step 4: no answer within 30 s (train.collective_timeout_s): its node "
            "stopped responding or its link is down") in text


def test_a_timeout_with_every_rank_answering_or_no_store_says_so():
    assert "though every rank answered a roll call" in str(ds.peer_lost(TIMED_OUT, step=4, roll_call=lambda step: []))
    text = str(ds.peer_lost(TIMED_OUT, step=4, roll_call=lambda step: None))
    assert "no answer from the other ranks within 30 s (train.collective_timeout_s) at step 4" in text and "this rank's node may be the one cut off" in text


def test_the_roll_call_lists_the_ranks_that_never_check_in(monkeypatch):
    """Through a real store: this rank checks in, rank 1 (absent) does not."""
    store = ds.dist.HashStore()
    monkeypatch.setattr(ds.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(ds.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(ds.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(ds.dist.distributed_c10d, "_get_default_store", lambda: store)
    assert ds.silent_ranks(step=5, wait_s=0.3) == [1]
    store.set("sift/roll-call/6/1", "1")
    assert ds.silent_ranks(step=6, wait_s=5) == []


def test_other_errors_are_left_alone():
    assert ds.peer_lost(RuntimeError("CUDA out of memory"), step=1) is None
