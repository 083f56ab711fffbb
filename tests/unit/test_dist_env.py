"""Rank discovery from faked launcher environments, SLURM host lists, and waiting for the master."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher.dist_env import DistEnv, export, pick_address, resolve, wait_for_master
from launcher.errors import LaunchError
from launcher.hostlist import expand_hostlist, expand_tasks_per_node

REPO = Path(__file__).resolve().parents[2]


def never_called():
    raise AssertionError("MPI discovery must not run here")


# ---- torchrun / deepspeed launcher ----

TORCHRUN = {"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "5", "LOCAL_WORLD_SIZE": "8", "MASTER_ADDR": "10.0.0.1",
            "MASTER_PORT": "29400", "TORCHELASTIC_RUN_ID": "sift", "GROUP_RANK": "0"}
DEEPSPEED = {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_SIZE": "8", "CROSS_RANK": "1",
             "CROSS_SIZE": "2", "MASTER_ADDR": "p4d-1", "MASTER_PORT": "29500"}


def test_torchrun():
    assert resolve(TORCHRUN, mpi_master_addr=never_called) == DistEnv(5, 5, 16, 8, "10.0.0.1", 29400, "torchrun")


def test_deepspeed_launcher_sets_local_size_not_local_world_size():
    assert resolve(DEEPSPEED) == DistEnv(9, 1, 16, 8, "p4d-1", 29500, "deepspeed")


def test_per_process_variables_win_over_an_outer_srun_or_batch_step():
    # one srun task per node running torchrun: SLURM_* describe the node-level task, not the rank
    env = {**TORCHRUN, "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0", "SLURM_LOCALID": "0"}
    assert resolve(env).source == "torchrun" and resolve(env).world_size == 16


def test_outer_mpirun_per_node_is_allowed_but_a_smaller_world_is_not():
    nested = {**DEEPSPEED, "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1"}
    assert resolve(nested).rank == 9
    with pytest.raises(LaunchError, match="WORLD_SIZE=16 is smaller than OMPI_COMM_WORLD_SIZE=32"):
        resolve({**DEEPSPEED, "OMPI_COMM_WORLD_SIZE": "32", "OMPI_COMM_WORLD_RANK": "3"})
    with pytest.raises(LaunchError, match="RANK=9 disagrees with OMPI_COMM_WORLD_RANK=3"):
        resolve({**DEEPSPEED, "OMPI_COMM_WORLD_SIZE": "16", "OMPI_COMM_WORLD_RANK": "3"})


def test_all_torch_env_problems_are_listed():
    env = {"RANK": "16", "WORLD_SIZE": "16", "LOCAL_RANK": "x", "MASTER_PORT": "70000"}
    with pytest.raises(LaunchError) as err:
        resolve(env)
    msg = str(err.value)
    for fragment in ("RANK=16 is outside 0..WORLD_SIZE-1", "LOCAL_RANK='x' is not an integer",
                     "LOCAL_WORLD_SIZE or LOCAL_SIZE is not set", "MASTER_ADDR is not set",
                     "MASTER_PORT=70000 is not a TCP port"):
        assert fragment in msg


# ---- Open MPI ----

OMPI = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}


def test_openmpi_with_master_addr_never_touches_mpi():
    env = {**OMPI, "MASTER_ADDR": "node0", "MASTER_PORT": "1234"}
    assert resolve(env, mpi_master_addr=never_called) == DistEnv(3, 1, 4, 2, "node0", 1234, "openmpi")


def test_openmpi_without_master_addr_asks_mpi_once():
    calls = []
    dist = resolve(OMPI, mpi_master_addr=lambda: calls.append(1) or "10.1.2.3")
    assert (dist.master_addr, dist.master_port, calls) == ("10.1.2.3", 29500, [1])


def test_single_process_mpirun_needs_no_discovery():
    env = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "1", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "1"}
    assert resolve(env, mpi_master_addr=never_called).master_addr == "127.0.0.1"


def test_stale_torch_variables_under_mpirun_are_named():
    env = {**OMPI, "WORLD_SIZE": "8", "LOCAL_RANK": "0", "MASTER_ADDR": "x"}
    with pytest.raises(LaunchError) as err:
        resolve(env)
    assert "WORLD_SIZE='8' disagrees with OMPI_COMM_WORLD_SIZE=4" in str(err.value)
    assert "LOCAL_RANK='0' disagrees with OMPI_COMM_WORLD_LOCAL_RANK=1" in str(err.value)


def test_openmpi_rank_outside_world():
    with pytest.raises(LaunchError, match=r"OMPI_COMM_WORLD_RANK=4 is outside 0..OMPI_COMM_WORLD_SIZE-1"):
        resolve({**OMPI, "OMPI_COMM_WORLD_RANK": "4", "MASTER_ADDR": "x"})
    with pytest.raises(LaunchError, match="OMPI_COMM_WORLD_LOCAL_SIZE is not set"):
        resolve({k: v for k, v in OMPI.items() if k != "OMPI_COMM_WORLD_LOCAL_SIZE"})


# ---- SLURM ----

SRUN = {"SLURM_PROCID": "10", "SLURM_NTASKS": "16", "SLURM_LOCALID": "2", "SLURM_NODEID": "1",
        "SLURM_STEP_ID": "0", "SLURM_STEP_TASKS_PER_NODE": "8(x2)", "SLURM_JOB_NODELIST": "p4d-st1-[01-03,07],gpu9",
        "SLURM_STEP_NODELIST": "p4d-st1-[03,07]"}


def test_srun_task_takes_master_from_the_step_nodelist():
    assert resolve(SRUN) == DistEnv(10, 2, 16, 8, "p4d-st1-03", 29500, "slurm")


def test_srun_falls_back_to_the_job_nodelist_and_honours_master_addr():
    env = {k: v for k, v in SRUN.items() if k != "SLURM_STEP_NODELIST"}
    assert resolve(env).master_addr == "p4d-st1-01"
    assert resolve({**env, "MASTER_ADDR": "10.0.0.9", "MASTER_PORT": "2222"}).master_addr == "10.0.0.9"


def test_uneven_tasks_per_node():
    env = {**SRUN, "SLURM_NTASKS": "3", "SLURM_PROCID": "2", "SLURM_LOCALID": "0",
           "SLURM_STEP_TASKS_PER_NODE": "2,1", "SLURM_NODEID": "1"}
    assert resolve(env).local_world_size == 1


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"SLURM_PROCID": "16"}, "SLURM_PROCID=16 is outside 0..SLURM_NTASKS-1"),
        ({"SLURM_NTASKS": "12"}, "SLURM_NTASKS=12 but the tasks per node '8(x2)' add up to 16"),
        ({"SLURM_LOCALID": "8"}, "SLURM_LOCALID=8 is outside"),
        ({"SLURM_NODEID": "2"}, "SLURM_NODEID=2 is outside the 2 nodes"),
        ({"WORLD_SIZE": "8"}, "WORLD_SIZE='8' disagrees with SLURM_NTASKS=16"),
        ({"SLURM_STEP_NODELIST": "p4d-[02-01]"}, "runs backwards"),
        ({"SLURM_STEP_TASKS_PER_NODE": "8(2)"}, "bad entry '8(2)'"),
    ],
)
def test_slurm_inconsistencies(change, fragment):
    with pytest.raises(LaunchError, match="SLURM") as err:
        resolve({**SRUN, **change})
    assert fragment in str(err.value)


def test_a_batch_script_without_srun_is_one_process():
    batch = {"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "p4d-[1-2]"}
    assert resolve(batch).source == "single"


# ---- single process ----

def test_no_launcher_is_one_local_process():
    assert resolve({}) == DistEnv(0, 0, 1, 1, "127.0.0.1", 29500, "single")


def test_world_size_without_rank_is_an_error():
    with pytest.raises(LaunchError, match="WORLD_SIZE=4 is set but RANK is not"):
        resolve({"WORLD_SIZE": "4"})


# ---- export ----

def test_export_sets_the_six_variables_env_init_reads():
    env = {"KEEP": "1", "RANK": "stale"}
    export(DistEnv(3, 1, 4, 2, "h0", 1234, "openmpi"), env)
    assert env == {"KEEP": "1", "RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
                   "MASTER_ADDR": "h0", "MASTER_PORT": "1234"}
    assert resolve(env) == DistEnv(3, 1, 4, 2, "h0", 1234, "torchrun")  # round trip


# ---- SLURM host lists ----

@pytest.mark.parametrize(
    ("hostlist", "hosts"),
    [
        ("p4d-st1-[01-03,07],gpu9", ["p4d-st1-01", "p4d-st1-02", "p4d-st1-03", "p4d-st1-07", "gpu9"]),
        ("node[8-10]", ["node8", "node9", "node10"]),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
        ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
        ("a,b[0],c", ["a", "b0", "c"]),
        ("ip-10-0-0-1", ["ip-10-0-0-1"]),
    ],
)
def test_expand_hostlist(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize("bad", ["", "a,,b", "n[1-2", "n1-2]", "n[a-b]", "n[3-1]", "n[[1]]"])
def test_expand_hostlist_rejects(bad):
    with pytest.raises(LaunchError):
        expand_hostlist(bad)


def test_expand_tasks_per_node():
    assert expand_tasks_per_node("8(x2),4") == [8, 8, 4]
    with pytest.raises(LaunchError):
        expand_tasks_per_node("8x2")


# ---- master address choice (NCCL_SOCKET_IFNAME syntax) ----

IFACES = [("lo", "127.0.0.1"), ("docker0", "172.17.0.1"), ("ens32", "10.0.1.5"), ("eth1", "10.0.2.5")]


@pytest.mark.parametrize(
    ("spec", "addr"),
    [(None, "10.0.1.5"), ("^lo,docker", "10.0.1.5"), ("eth", "10.0.2.5"), ("=eth1", "10.0.2.5"),
     ("=eth", None), ("^ens,lo,docker", "10.0.2.5"), ("lo", None)],
)
def test_pick_address(spec, addr):
    assert pick_address(IFACES, spec) == addr


# ---- waiting for the master ----

def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_wait_for_master_times_out_naming_what_to_check():
    port = _closed_port()
    start = time.monotonic()
    with pytest.raises(LaunchError) as err:
        wait_for_master("127.0.0.1", port, timeout_s=0.3)
    assert time.monotonic() - start < 3
    msg = str(err.value)
    assert f"127.0.0.1:{port}" in msg and "MASTER_ADDR" in msg and "NCCL_SOCKET_IFNAME" in msg and "firewall" in msg


def test_wait_for_master_returns_once_the_store_listens():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        wait_for_master("127.0.0.1", server.getsockname()[1], timeout_s=5)


# ---- mpi4py: missing package, missing library, and a real 2-rank broadcast ----

def _run(code: str, env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), **env_extra}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)


RESOLVE_UNDER_MPIRUN = (
    "from launcher.dist_env import resolve\n"
    "from launcher.errors import LaunchError\n"
    "import os\n"
    "try:\n    print(resolve(os.environ).master_addr)\n"
    "except LaunchError as e:\n    print('LaunchError:', e)\n"
)


def test_missing_mpi4py_gives_an_install_hint(monkeypatch):
    import launcher.dist_env as de

    monkeypatch.setattr(de.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LaunchError, match=r"mpi4py is not installed: `pip install mpi4py`.*MASTER_ADDR"):
        resolve(OMPI)


def test_missing_libmpi_gives_an_install_hint():
    pytest.importorskip("mpi4py")
    fake_mpirun = {**OMPI, "MPI4PY_LIBMPI": "/nonexistent/libmpi.so"}
    out = _run(RESOLVE_UNDER_MPIRUN, fake_mpirun).stdout
    assert "LaunchError: mpi4py is installed but cannot load an MPI library" in out
    assert "LD_LIBRARY_PATH" in out


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="Open MPI (mpirun) not installed")
def test_two_ranks_under_mpirun_agree_on_rank0_address(tmp_path):
    pytest.importorskip("mpi4py")
    code = RESOLVE_UNDER_MPIRUN.replace(
        "print(resolve(os.environ).master_addr)",  # one file per rank: mpirun may interleave stdout
        f"open({str(tmp_path)!r} + '/' + os.environ['OMPI_COMM_WORLD_RANK'], 'w').write(resolve(os.environ).master_addr)",
    )
    proc = subprocess.run(
        ["mpirun", "-np", "2", "--oversubscribe", "--allow-run-as-root", "-x", "PYTHONPATH", sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    addrs = [(tmp_path / str(rank)).read_text() for rank in (0, 1)]
    assert addrs[0] == addrs[1]
    socket.inet_aton(addrs[0])  # an IPv4 address, chosen on rank 0 and broadcast
