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


def test_a_silent_peer_is_named_by_the_timeout():
    err = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 30000ms for recv operation")
    text = str(ds.peer_lost(err, step=4))
    assert "no answer from the other ranks within 30 s (train.collective_timeout_s) at step 4" in text


def test_other_errors_are_left_alone():
    assert ds.peer_lost(RuntimeError("CUDA out of memory"), step=1) is None
