"""Each backend's argv from a LaunchPlan, compared as lists."""

from __future__ import annotations

import shlex

import pytest

from launcher.commands import LaunchPlan, build_command, master_addr
from launcher.errors import LaunchError

TWO_P4D = {"p4d-1": tuple(range(8)), "p4d-2": tuple(range(8))}
EFA = {"FI_EFA_USE_HUGE_PAGE": "0", "NCCL_SOCKET_IFNAME": "^lo,docker"}
ARGS = ("--config", "run.yaml")


def plan(**kw) -> LaunchPlan:
    base = {"resources": TWO_P4D, "train_args": ARGS, "python": "python3"}
    return LaunchPlan(**{**base, **kw})


def test_mpirun_two_p4d_nodes():
    argv = build_command("mpirun", plan(env=EFA, pass_env=("PATH", "LD_LIBRARY_PATH")))
    assert argv == [
        "mpirun", "-np", "16", "-H", "p4d-1:8,p4d-2:8", "--map-by", "ppr:8:node", "--bind-to", "none",
        "--mca", "pml", "^cm", "--mca", "btl_tcp_if_exclude", "lo,docker0",
        "-x", "PATH", "-x", "LD_LIBRARY_PATH",
        "-x", "MASTER_ADDR=p4d-1", "-x", "MASTER_PORT=29500",
        "-x", "FI_EFA_USE_HUGE_PAGE=0", "-x", "NCCL_SOCKET_IFNAME=^lo,docker",
        "python3", "-u", "launcher/train.py", "--config", "run.yaml",
    ]


def test_mpirun_single_host_ci_flags_numa_binding_and_interface():
    argv = build_command("mpirun", plan(resources={"localhost": (0, 1)}, oversubscribe=True, allow_run_as_root=True))
    assert argv[:12] == ["mpirun", "-np", "2", "-H", "localhost:2", "--map-by", "ppr:2:node", "--bind-to", "none",
                         "--mca", "pml", "^cm"]
    assert argv[12:14] == ["--oversubscribe", "--allow-run-as-root"]  # no btl exclude on one host
    assert "MASTER_ADDR=127.0.0.1" in argv
    numa = build_command("mpirun", plan(bind="numa", tcp_iface="ens32"))
    assert numa[5:9] == ["--map-by", "ppr:4:socket", "--bind-to", "socket"]
    assert numa[12:15] == ["--mca", "btl_tcp_if_include", "ens32"] and "btl_tcp_if_exclude" not in numa


def test_mpirun_uneven_hosts_map_by_slot_and_numa_needs_even_uniform_counts():
    uneven = {"a": tuple(range(8)), "b": (0, 1, 2, 3)}
    argv = build_command("mpirun", plan(resources=uneven))
    assert argv[1:9] == ["-np", "12", "-H", "a:8,b:4", "--map-by", "slot", "--bind-to", "none"]
    with pytest.raises(LaunchError, match="--bind numa needs the same, even number"):
        build_command("mpirun", plan(resources=uneven, bind="numa"))


def test_same_gpu_subset_everywhere_becomes_cuda_visible_devices():
    subset = {"a": (2, 5), "b": (2, 5)}
    assert "CUDA_VISIBLE_DEVICES=2,5" in build_command("mpirun", plan(resources=subset))
    assert "CUDA_VISIBLE_DEVICES=2,5" in build_command("srun", plan(resources=subset))
    with pytest.raises(LaunchError, match="different GPU subsets"):
        build_command("mpirun", plan(resources={"a": (2, 5), "b": (1, 5)}))
    prefix = {"a": (0, 1), "b": (0, 1)}  # slots 0..n-1 need no variable
    assert not any(a.startswith("CUDA_VISIBLE_DEVICES") for a in build_command("mpirun", plan(resources=prefix)))


def test_srun_one_task_per_gpu():
    argv = build_command("srun", plan(env={"FI_EFA_USE_HUGE_PAGE": "0"}, master_addr="10.0.0.1", master_port=6000))
    assert argv == [
        "env", "MASTER_ADDR=10.0.0.1", "MASTER_PORT=6000", "FI_EFA_USE_HUGE_PAGE=0",
        "srun", "--nodes", "2", "--ntasks-per-node", "8", "--nodelist", "p4d-1,p4d-2", "--kill-on-bad-exit=1",
        "--cpu-bind=none", "python3", "-u", "launcher/train.py", "--config", "run.yaml",
    ]
    assert "--cpu-bind=ldoms" in build_command("srun", plan(bind="numa"))
    with pytest.raises(LaunchError, match="srun starts the same number of processes on every node"):
        build_command("srun", plan(resources={"a": (0, 1), "b": (0,)}))


def test_torchrun_single_and_multi_node():
    assert build_command("torchrun", plan(resources={"localhost": (0, 1, 2, 3)})) == [
        "torchrun", "--standalone", "--nnodes=1", "--nproc-per-node=4", "launcher/train.py", "--config", "run.yaml"]
    assert build_command("torchrun", plan(env={"X": "1"}, module=True, script="launcher.train", rdzv_id="job7")) == [
        "env", "X=1", "torchrun", "--nnodes=2", "--nproc-per-node=8", "--rdzv-backend=c10d",
        "--rdzv-endpoint=p4d-1:29500", "--rdzv-id=job7", "--module", "launcher.train", "--config", "run.yaml"]
    # this node's address (sift launch finds it on the route to the endpoint) for MASTER_ADDR and node order
    argv = build_command("torchrun", plan(local_addr="10.0.0.2", rdzv_host=False))
    assert "--local-addr=10.0.0.2" in argv and "--rdzv-conf=is_host=0" in argv


def test_deepspeed_pdsh_with_hostfile_and_filter():
    argv = build_command("deepspeed", plan(hostfile="hostfile", include="p4d-1@p4d-2:0,1", master_addr="10.0.0.1"))
    assert argv == ["deepspeed", "--hostfile", "hostfile", "--include", "p4d-1@p4d-2:0,1",
                    "--master_addr", "10.0.0.1", "--master_port", "29500", "launcher/train.py", "--config", "run.yaml"]


def test_deepspeed_single_remote_host_forces_multi_node_mode():
    argv = build_command("deepspeed", plan(resources={"p4d-1": tuple(range(8))}, hostfile="hf"))
    assert "--force_multi" in argv


def test_deepspeed_local_launch_passes_env_in_a_prefix():
    assert build_command("deepspeed", plan(resources={"localhost": (0, 1)}, env={"A": "1"}, module=True,
                                           script="launcher.train")) == [
        "env", "A=1", "deepspeed", "--num_gpus", "2", "--master_port", "29500", "--module", "launcher.train",
        "--config", "run.yaml"]
    assert build_command("deepspeed", plan(resources={"localhost": (1, 3)}))[1:3] == ["--include", "localhost:1,3"]
    # a hostfile naming only localhost is a local launch too: no --force_multi, no ssh
    local_hf = build_command("deepspeed", plan(resources={"localhost": (0, 1)}, hostfile="hf"))
    assert local_hf[:3] == ["deepspeed", "--hostfile", "hf"] and "--force_multi" not in local_hf


def test_deepspeed_openmpi_runner_gets_master_and_placement_through_launcher_args():
    argv = build_command("deepspeed", plan(hostfile="hf", ds_launcher="openmpi", allow_run_as_root=True))
    assert argv[:11] == ["deepspeed", "--hostfile", "hf", "--force_multi", "--no_ssh_check", "--master_addr", "p4d-1",
                         "--master_port", "29500", "--launcher", "openmpi"]
    assert argv[11] == "--launcher_args"
    inner = shlex.split(argv[12])  # the runner shlex-splits this string again
    assert inner == ["--map-by", "ppr:8:node", "--bind-to", "none", "--mca", "pml", "^cm", "--allow-run-as-root",
                     "-x", "MASTER_ADDR=p4d-1", "-x", "MASTER_PORT=29500"]
    assert "btl_tcp_if_exclude" not in inner  # would clash with the runner's own btl_tcp_if_include
    with pytest.raises(LaunchError, match="rejects --include/--exclude"):
        build_command("deepspeed", plan(hostfile="hf", ds_launcher="openmpi", exclude="p4d-2"))


def test_deepspeed_slurm_runner_gets_master_through_the_environment():
    argv = build_command("deepspeed", plan(hostfile="hf", ds_launcher="slurm", master_port=7000))
    assert argv[:4] == ["env", "MASTER_ADDR=p4d-1", "MASTER_PORT=7000", "deepspeed"]
    assert argv[7:10] == ["--no_ssh_check", "--master_addr", "p4d-1"]
    assert argv[argv.index("--launcher") + 1] == "slurm"


def test_deepspeed_needs_a_hostfile_for_remote_hosts():
    with pytest.raises(LaunchError, match="needs a hostfile"):
        build_command("deepspeed", plan())


def test_master_address_defaults():
    assert master_addr(plan()) == "p4d-1"
    assert master_addr(plan(resources={"localhost": (0,)})) == "127.0.0.1"
    assert master_addr(plan(master_addr="10.9.9.9")) == "10.9.9.9"
    with pytest.raises(LaunchError, match="the first host is 'localhost'"):
        master_addr(plan(resources={"localhost": (0,), "p4d-2": (0,)}))


def test_unknown_backend():
    with pytest.raises(LaunchError, match="unknown backend 'ray'"):
        build_command("ray", plan())
