"""The checks `sift launch` makes before starting ranks, with the ssh probe replaced (no network), and
the gloo interface choice of launcher/dist_env.py."""

from __future__ import annotations

import socket

import pytest

from launcher.dist_env import interface_of, prepare_process, route_source
from launcher.errors import LaunchError
from launcher.preflight import check_hosts, check_port_free


def probe(answers):
    return lambda host: answers[host]


def test_every_silent_host_and_every_overfull_host_is_named_at_once():
    slots = {"a": 2, "b": 8, "c": 4, "d": 2}
    answers = {"a": (0, ""), "b": (4, ""), "c": (None, "ssh: connect to host c port 22: No route to host"),
               "d": (8, "")}
    with pytest.raises(LaunchError) as e:
        check_hosts(slots, probe(answers))
    text = str(e.value)
    assert "host c does not answer ssh (ssh: connect to host c port 22: No route to host)" in text
    assert "host b is given 8 slots but has 4 GPUs (nvidia-smi -L): give it slots=4 or fewer" in text
    assert "host a" not in text and "host d" not in text  # no GPU (a CPU run) or enough GPUs


def test_good_hosts_pass():
    check_hosts({"a": 2, "b": 2}, probe({"a": (2, ""), "b": (0, "")}))


def test_a_taken_master_port_is_refused_and_a_free_one_passes():
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        with pytest.raises(LaunchError, match=f"port {port} on the master 127.0.0.1 is already in use"):
            check_port_free("127.0.0.1", port)
    check_port_free("127.0.0.1", port)  # closed again: nothing listens


def test_gloo_uses_the_interface_on_the_route_to_the_master():
    ifaces = [("lo", "127.0.0.1"), ("eth0", "10.1.2.3"), ("eth1", "192.168.0.7")]
    assert interface_of("192.168.0.7", ifaces) == "eth1"
    assert interface_of("10.9.9.9", ifaces) is None
    assert route_source("127.0.0.1", 29500) == "127.0.0.1"  # a UDP connect: nothing is sent


def test_one_host_runs_leave_gloo_alone():
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "29500"}
    prepare_process(env)
    assert "GLOO_SOCKET_IFNAME" not in env and "SIFT_HOST_ADDR" not in env
