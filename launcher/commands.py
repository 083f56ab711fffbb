"""The exact argv each launcher backend runs, built by pure functions from one LaunchPlan.

Backends:
- deepspeed  the deepspeed launcher with a hostfile; its own runner is pdsh (ssh), openmpi or slurm.
- mpirun     Open MPI directly: one process per GPU, ranks from OMPI_COMM_WORLD_*, MASTER_* via -x.
- srun       one task per GPU inside a SLURM allocation; ranks from SLURM_*.
- torchrun   one torchrun per node (c10d rendezvous), which starts the per-GPU processes.

Nothing here reads the environment or the file system; `launcher.launch` gathers those facts.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field

from launcher.dist_env import DEFAULT_MASTER_PORT
from launcher.errors import LaunchError

BACKENDS = ("deepspeed", "mpirun", "srun", "torchrun")
DS_LAUNCHERS = ("pdsh", "openmpi", "slurm")
BIND_MODES = ("none", "numa")
LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1"})
DEFAULT_SCRIPT = "launcher/train.py"
INSTALLED_MODULE = "launcher.train"
"""What runs instead of DEFAULT_SCRIPT outside a clone of the repository: `python -m launcher.train`."""


@dataclass(frozen=True, kw_only=True)
class LaunchPlan:
    resources: Mapping[str, tuple[int, ...]]  # host -> GPU slot ids it runs on, hosts in rank order
    script: str = DEFAULT_SCRIPT
    module: bool = False  # `script` is a module name, run as `python -m`
    train_args: tuple[str, ...] = ()
    master_addr: str | None = None  # None: the first host (deepspeed/pdsh asks that host itself)
    master_port: int = DEFAULT_MASTER_PORT
    env: Mapping[str, str] = field(default_factory=dict)  # set explicitly for every rank
    pass_env: tuple[str, ...] = ()  # forwarded by name with their current values (mpirun -x NAME)
    python: str = "python"
    hostfile: str | None = None  # deepspeed backend: the hostfile to hand it
    include: str = ""  # deepspeed backend: passed through verbatim
    exclude: str = ""
    ds_launcher: str = "pdsh"
    bind: str = "none"
    oversubscribe: bool = False
    allow_run_as_root: bool = False
    tcp_iface: str | None = None  # the interface Open MPI's own TCP traffic uses
    rdzv_id: str = "sift"
    local_addr: str | None = None  # torchrun: this node's address as the other nodes reach it
    rdzv_host: bool | None = None  # torchrun: this node serves the rendezvous store (None: torchrun guesses)


def is_local(resources: Mapping[str, tuple[int, ...]]) -> bool:
    """One host, and it is this machine by name."""
    return len(resources) == 1 and next(iter(resources)) in LOCAL_HOSTS


def master_addr(plan: LaunchPlan) -> str:
    """The given master address, else the first host (rank 0 runs there under every backend)."""
    if plan.master_addr:
        return plan.master_addr
    if is_local(plan.resources):
        return "127.0.0.1"
    first = next(iter(plan.resources))
    if first in LOCAL_HOSTS:
        raise LaunchError(
            f"the first host is {first!r}, which the other hosts cannot dial; list hosts by a name or address "
            f"they can all resolve, or pass --master-addr"
        )
    return first


def _ranks_per_node(plan: LaunchPlan, backend: str) -> int:
    counts = {len(slots) for slots in plan.resources.values()}
    if len(counts) != 1:
        per_host = {h: len(s) for h, s in plan.resources.items()}
        raise LaunchError(
            f"{backend} starts the same number of processes on every node, but the hosts have {per_host}; "
            f"filter to the same GPU count per host or use --backend mpirun"
        )
    return counts.pop()


def _device_env(plan: LaunchPlan, backend: str) -> dict[str, str]:
    """CUDA_VISIBLE_DEVICES for slot subsets like `host:0,2`: LOCAL_RANK k must land on the k-th slot.

    Slots 0..n-1 need nothing. Other subsets work only if every host uses the same ones, since one
    value goes to all ranks.
    """
    subsets = {tuple(s) for s in plan.resources.values() if tuple(s) != tuple(range(len(s)))}
    if not subsets:
        return {}
    if len({tuple(s) for s in plan.resources.values()}) != 1:
        raise LaunchError(
            f"{backend} cannot give different GPU subsets to different hosts ({dict(plan.resources)}); "
            f"use the same slots on every host, or --backend deepspeed, which sets CUDA_VISIBLE_DEVICES per node"
        )
    return {"CUDA_VISIBLE_DEVICES": ",".join(map(str, subsets.pop()))}


def _entry(plan: LaunchPlan) -> list[str]:
    return [plan.python, "-u", *(["-m"] if plan.module else []), plan.script, *plan.train_args]


def _env_prefix(env: Mapping[str, str]) -> list[str]:
    return ["env", *(f"{k}={v}" for k, v in env.items())] if env else []


def mpirun_placement(plan: LaunchPlan, per_node: int | None) -> list[str]:
    """Open MPI 4.1 mapping/binding flags. `none` leaves DataLoader workers free to use every core;
    `numa` puts local ranks 0..n/2-1 on socket 0 and the rest on socket 1, matching p4d, where GPUs 0-3
    hang off the first CPU socket and 4-7 off the second."""
    if plan.bind == "numa":
        if per_node is None or per_node % 2:
            raise LaunchError("--bind numa needs the same, even number of GPUs on every host (p4d: 8)")
        return ["--map-by", f"ppr:{per_node // 2}:socket", "--bind-to", "socket"]
    if plan.bind != "none":
        raise LaunchError(f"--bind {plan.bind!r}: choose one of {', '.join(BIND_MODES)}")
    return ["--map-by", f"ppr:{per_node}:node" if per_node else "slot", "--bind-to", "none"]


def _mpirun_options(plan: LaunchPlan, per_node: int | None, *, tcp_exclude: bool = True) -> list[str]:
    argv = mpirun_placement(plan, per_node)
    # MPI itself carries only start-up traffic here; keep it off EFA (the cm PML would open EFA
    # endpoints in every rank) and off loopback/docker bridges between hosts.
    argv += ["--mca", "pml", "^cm"]
    if plan.tcp_iface:
        argv += ["--mca", "btl_tcp_if_include", plan.tcp_iface]
    elif tcp_exclude and len(plan.resources) > 1:
        argv += ["--mca", "btl_tcp_if_exclude", "lo,docker0"]
    argv += ["--oversubscribe"] if plan.oversubscribe else []
    argv += ["--allow-run-as-root"] if plan.allow_run_as_root else []
    return argv


def mpirun_command(plan: LaunchPlan) -> list[str]:
    """`mpirun -np N -H host:n,...` with MASTER_ADDR/MASTER_PORT and the rank environment exported."""
    counts = {len(s) for s in plan.resources.values()}
    per_node = counts.pop() if len(counts) == 1 else None
    total = sum(len(s) for s in plan.resources.values())
    env = {"MASTER_ADDR": master_addr(plan), "MASTER_PORT": str(plan.master_port),
           **_device_env(plan, "mpirun"), **plan.env}
    argv = ["mpirun", "-np", str(total), "-H", ",".join(f"{h}:{len(s)}" for h, s in plan.resources.items())]
    argv += _mpirun_options(plan, per_node)
    for name in plan.pass_env:
        argv += ["-x", name]
    for k, v in env.items():
        argv += ["-x", f"{k}={v}"]
    return argv + _entry(plan)


def srun_command(plan: LaunchPlan) -> list[str]:
    """One srun task per GPU. srun exports the caller's environment (--export=ALL is its default), so
    settings go in an `env` prefix: srun's own --export would split values like `^lo,docker` on commas."""
    per_node = _ranks_per_node(plan, "srun")
    env = {"MASTER_ADDR": master_addr(plan), "MASTER_PORT": str(plan.master_port),
           **_device_env(plan, "srun"), **plan.env}
    cpu_bind = {"none": "none", "numa": "ldoms"}.get(plan.bind)
    if cpu_bind is None:
        raise LaunchError(f"--bind {plan.bind!r}: choose one of {', '.join(BIND_MODES)}")
    return [*_env_prefix(env), "srun", "--nodes", str(len(plan.resources)), "--ntasks-per-node", str(per_node),
            "--nodelist", ",".join(plan.resources), "--kill-on-bad-exit=1", f"--cpu-bind={cpu_bind}", *_entry(plan)]


def torchrun_command(plan: LaunchPlan) -> list[str]:
    """torchrun for this node; on several nodes the same command runs on each (c10d rendezvous)."""
    per_node = _ranks_per_node(plan, "torchrun")
    env = {**_device_env(plan, "torchrun"), **plan.env}
    argv = [*_env_prefix(env), "torchrun"]
    if len(plan.resources) == 1:
        argv += ["--standalone", "--nnodes=1", f"--nproc-per-node={per_node}"]
    else:
        argv += [f"--nnodes={len(plan.resources)}", f"--nproc-per-node={per_node}", "--rdzv-backend=c10d",
                 f"--rdzv-endpoint={master_addr(plan)}:{plan.master_port}", f"--rdzv-id={plan.rdzv_id}"]
        # Without it torchrun hands the ranks the first node's host name as MASTER_ADDR (and orders the
        # nodes by pid), and a host name often resolves to 127.0.1.1 on its own machine only.
        argv += [f"--local-addr={plan.local_addr}"] if plan.local_addr else []
        # torchrun's own guess compares the endpoint with what this machine's host name resolves to,
        # which misses an endpoint given as an address: then no node serves the store.
        argv += [f"--rdzv-conf=is_host={int(plan.rdzv_host)}"] if plan.rdzv_host is not None else []
    return argv + (["--module"] if plan.module else []) + [plan.script, *plan.train_args]


def deepspeed_command(plan: LaunchPlan) -> list[str]:
    """The deepspeed launcher. Multi-node settings reach the ranks through `.deepspeed_env` (written
    by `sift launch`); `plan.env` is used only for a launch on this machine alone, where the runner
    passes its own environment on and ignores that file."""
    if plan.ds_launcher not in DS_LAUNCHERS:
        raise LaunchError(f"--ds-launcher {plan.ds_launcher!r}: choose one of {', '.join(DS_LAUNCHERS)}")
    multi = not is_local(plan.resources) or plan.ds_launcher != "pdsh"
    if plan.hostfile is None and multi:
        raise LaunchError("the deepspeed launcher needs a hostfile for remote hosts (sift launch writes one)")
    prefix = {} if multi else dict(plan.env)
    if plan.ds_launcher == "slurm":  # the slurm runner's srun passes the caller's environment on
        prefix |= {"MASTER_ADDR": master_addr(plan), "MASTER_PORT": str(plan.master_port)}
    argv = [*_env_prefix(prefix), "deepspeed"]
    if plan.hostfile is None:
        (slots,) = plan.resources.values()
        argv += (["--num_gpus", str(len(slots))] if tuple(slots) == tuple(range(len(slots)))
                 else ["--include", "localhost:" + ",".join(map(str, slots))])
    else:
        argv += ["--hostfile", plan.hostfile]
        if plan.ds_launcher == "openmpi" and (plan.include or plan.exclude):
            raise LaunchError("deepspeed's openmpi runner rejects --include/--exclude; hand it a filtered hostfile")
        argv += ["--include", plan.include] if plan.include else []
        argv += ["--exclude", plan.exclude] if plan.exclude else []
        # Without this the runner launches on this machine when the (filtered) pool has one host,
        # ignoring both that host's name and --launcher.
        if multi and (len(plan.resources) == 1 or plan.ds_launcher != "pdsh"):
            argv += ["--force_multi"]
    if plan.ds_launcher != "pdsh":
        # The runner would otherwise ssh to the first host twice (a reachability check, and
        # `hostname -I` for the address) although mpirun/srun start the processes.
        argv += ["--no_ssh_check", "--master_addr", master_addr(plan)]
    elif plan.master_addr:
        argv += ["--master_addr", plan.master_addr]
    argv += ["--master_port", str(plan.master_port)]
    launcher_args: list[str] = []
    if plan.ds_launcher != "pdsh":
        argv += ["--launcher", plan.ds_launcher]
    if plan.ds_launcher == "openmpi":
        counts = {len(s) for s in plan.resources.values()}
        # The runner adds `--mca btl_tcp_if_include eth0` unless launcher_args name an interface, and
        # Open MPI refuses include and exclude together: so no exclude list here (use --tcp-iface).
        per_node = counts.pop() if len(counts) == 1 else None
        launcher_args += _mpirun_options(plan, per_node, tcp_exclude=False)
        launcher_args += ["-x", f"MASTER_ADDR={master_addr(plan)}", "-x", f"MASTER_PORT={plan.master_port}"]
        for k, v in _device_env(plan, "deepspeed --launcher openmpi").items():
            launcher_args += ["-x", f"{k}={v}"]
    if launcher_args:
        argv += ["--launcher_args", shlex.join(launcher_args)]
    argv += ["--module"] if plan.module else []
    return [*argv, plan.script, *plan.train_args]


BUILDERS = {"deepspeed": deepspeed_command, "mpirun": mpirun_command, "srun": srun_command,
            "torchrun": torchrun_command}


def build_command(backend: str, plan: LaunchPlan) -> list[str]:
    """argv for `backend`; LaunchError for an unknown backend or a plan it cannot express."""
    if backend not in BUILDERS:
        raise LaunchError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    return BUILDERS[backend](plan)
