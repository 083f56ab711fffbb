"""Find this process's rank from whichever launcher started it, and export the torch variables.

`launcher/train.py` calls `resolve(os.environ)` then `export(...)` before anything else, so that
`deepspeed.init_distributed` and `torch.distributed` (env://) see RANK/WORLD_SIZE/MASTER_ADDR/... and
never need to guess. Sources, first match wins:

- torchrun / the deepspeed launcher: RANK, WORLD_SIZE, LOCAL_RANK are set per process. They win over
  SLURM_* and OMPI_*, which then describe an outer launcher (one task per node) or the batch step.
- Open MPI (`mpirun -np N python launcher/train.py`): OMPI_COMM_WORLD_*. Without MASTER_ADDR, rank 0's
  address is found and broadcast with mpi4py (imported only then).
- srun: SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, master = first host of the step's node list. Only
  inside a job step (SLURM_STEP_ID set): a batch script's own SLURM_PROCID=0 is not a rank.
- none of these: one process.

`resolve` is pure (environment in, DistEnv out) and lists every inconsistency it finds in one error.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, replace

from launcher.errors import LaunchError
from launcher.hostlist import expand_hostlist, expand_tasks_per_node

DEFAULT_MASTER_PORT = 29500  # torch.distributed's and DeepSpeed's default
HOST_ADDR_VAR = "SIFT_HOST_ADDR"  # this rank's address on the master's network (engine/ds.py names lost hosts by it)
LOCALHOST = "127.0.0.1"

__all__ = ["DistEnv", "LaunchError", "export", "interface_of", "mpi_master_addr", "pick_address", "resolve",
           "wait_for_master"]


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    source: str  # "torchrun", "deepspeed", "env", "openmpi", "slurm" or "single"


class _Reader:
    """Reads integers from the environment, collecting problems instead of stopping at the first."""

    def __init__(self, env: Mapping[str, str]):
        self.env = env
        self.problems: list[str] = []

    def int(self, *names: str, required: bool = True) -> int | None:
        """The first of `names` that is set, as an int; a missing or non-integer value is a problem."""
        for name in names:
            if name in self.env:
                raw = self.env[name].strip()
                try:
                    return int(raw)
                except ValueError:
                    self.problems.append(f"{name}={self.env[name]!r} is not an integer")
                    return None
        if required:
            self.problems.append(f"{' or '.join(names)} is not set")
        return None

    def fail_if_any(self, source: str) -> None:
        if self.problems:
            raise LaunchError(
                f"cannot work out this process's rank ({source}):\n  " + "\n  ".join(self.problems)
            )


def _check_ranges(r: _Reader, rank, world, local_rank, local_world, names: tuple[str, str, str, str]) -> None:
    rank_n, world_n, local_n, local_world_n = names
    if world is not None and world < 1:
        r.problems.append(f"{world_n}={world} must be at least 1")
    if rank is not None and world is not None and not 0 <= rank < world:
        r.problems.append(f"{rank_n}={rank} is outside 0..{world_n}-1 ({world_n}={world})")
    if local_world is not None and local_world < 1:
        r.problems.append(f"{local_world_n}={local_world} must be at least 1")
    if local_rank is not None and local_world is not None and not 0 <= local_rank < local_world:
        r.problems.append(f"{local_n}={local_rank} is outside 0..{local_world_n}-1 ({local_world_n}={local_world})")
    if local_world is not None and world is not None and local_world > world:
        r.problems.append(f"{local_world_n}={local_world} is larger than {world_n}={world}")


def _master_port(r: _Reader) -> int:
    port = r.int("MASTER_PORT", required=False)
    if port is None:
        return DEFAULT_MASTER_PORT
    if not 1 <= port <= 65535:
        r.problems.append(f"MASTER_PORT={port} is not a TCP port (1..65535)")
    return port


def _stray(r: _Reader, env: Mapping[str, str], name: str, expected: int, truth: str) -> None:
    """A torch variable left in the environment that disagrees with the launcher's own is an error."""
    if name in env and env[name].strip() != str(expected):
        r.problems.append(
            f"{name}={env[name]!r} disagrees with {truth}={expected}; unset {name} "
            f"(a leftover from the shell or a job script?) or launch with a consistent value"
        )


def _from_torch_env(env: Mapping[str, str]) -> DistEnv:
    r = _Reader(env)
    rank, world, local_rank = r.int("RANK"), r.int("WORLD_SIZE"), r.int("LOCAL_RANK")
    local_world = r.int("LOCAL_WORLD_SIZE", "LOCAL_SIZE")
    _check_ranges(r, rank, world, local_rank, local_world, ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"))
    # Under mpirun the per-process variables must agree with Open MPI's, unless an outer mpirun
    # started one launcher per node (then the world is larger than the MPI world).
    ompi_world = r.int("OMPI_COMM_WORLD_SIZE", required=False)
    ompi_rank = r.int("OMPI_COMM_WORLD_RANK", required=False)
    if ompi_world is not None and world is not None:
        if world < ompi_world:
            r.problems.append(
                f"WORLD_SIZE={world} is smaller than OMPI_COMM_WORLD_SIZE={ompi_world}: mpirun started more "
                f"processes than WORLD_SIZE allows; unset RANK/WORLD_SIZE/LOCAL_RANK when launching with mpirun"
            )
        elif world == ompi_world and ompi_rank is not None and rank is not None and rank != ompi_rank:
            r.problems.append(f"RANK={rank} disagrees with OMPI_COMM_WORLD_RANK={ompi_rank} (same world size)")
    if world is not None and world > 1:
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if not env.get(name, "").strip():
                r.problems.append(f"{name} is not set (torchrun and the deepspeed launcher always set it)")
    port = _master_port(r)
    r.fail_if_any("RANK/WORLD_SIZE/LOCAL_RANK from torchrun or the deepspeed launcher")
    if "TORCHELASTIC_RUN_ID" in env or "LOCAL_WORLD_SIZE" in env:
        source = "torchrun"
    elif "CROSS_RANK" in env or "LOCAL_SIZE" in env:
        source = "deepspeed"
    else:
        source = "env"
    return DistEnv(rank, local_rank, world, local_world, env.get("MASTER_ADDR", "").strip() or LOCALHOST,
                   port, source)


def _from_openmpi(env: Mapping[str, str], discover: Callable[[], str]) -> DistEnv:
    r = _Reader(env)
    rank, world = r.int("OMPI_COMM_WORLD_RANK"), r.int("OMPI_COMM_WORLD_SIZE")
    local_rank, local_world = r.int("OMPI_COMM_WORLD_LOCAL_RANK"), r.int("OMPI_COMM_WORLD_LOCAL_SIZE")
    _check_ranges(r, rank, world, local_rank, local_world, (
        "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"))
    if world is not None:
        _stray(r, env, "WORLD_SIZE", world, "OMPI_COMM_WORLD_SIZE")
    if local_rank is not None:
        _stray(r, env, "LOCAL_RANK", local_rank, "OMPI_COMM_WORLD_LOCAL_RANK")
    if local_world is not None:
        _stray(r, env, "LOCAL_WORLD_SIZE", local_world, "OMPI_COMM_WORLD_LOCAL_SIZE")
    port = _master_port(r)
    r.fail_if_any("Open MPI's OMPI_COMM_WORLD_* variables")
    addr = env.get("MASTER_ADDR", "").strip()
    if not addr:
        addr = LOCALHOST if world == 1 else discover()
    return DistEnv(rank, local_rank, world, local_world, addr, port, "openmpi")


def _from_slurm(env: Mapping[str, str]) -> DistEnv:
    r = _Reader(env)
    rank, world, local_rank = r.int("SLURM_PROCID"), r.int("SLURM_NTASKS", "SLURM_NPROCS"), r.int("SLURM_LOCALID")
    local_world = None
    per_node_spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    node_id = r.int("SLURM_NODEID", required=False)
    if per_node_spec:
        try:
            per_node = expand_tasks_per_node(per_node_spec)
        except LaunchError as exc:
            r.problems.append(str(exc))
        else:
            if world is not None and sum(per_node) != world:
                r.problems.append(f"SLURM_NTASKS={world} but the tasks per node {per_node_spec!r} add up to {sum(per_node)}")
            node = node_id if node_id is not None else 0 if len(per_node) == 1 else None
            if node is None:
                r.problems.append("SLURM_NODEID is not set, so this node's task count is unknown")
            elif not 0 <= node < len(per_node):
                r.problems.append(f"SLURM_NODEID={node} is outside the {len(per_node)} nodes of {per_node_spec!r}")
            else:
                local_world = per_node[node]
    else:
        local_world = r.int("SLURM_NTASKS_PER_NODE", required=False)
        if local_world is None:
            r.problems.append("neither SLURM_STEP_TASKS_PER_NODE nor SLURM_TASKS_PER_NODE is set")
    _check_ranges(r, rank, world, local_rank, local_world, (
        "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "tasks on this node"))
    if world is not None:
        _stray(r, env, "WORLD_SIZE", world, "SLURM_NTASKS")
    if local_rank is not None:
        _stray(r, env, "LOCAL_RANK", local_rank, "SLURM_LOCALID")
    addr = env.get("MASTER_ADDR", "").strip()
    if not addr:
        nodelist_var = next((n for n in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST") if env.get(n)), None)
        if nodelist_var is None:
            r.problems.append("no SLURM_STEP_NODELIST/SLURM_JOB_NODELIST to take the master host from; set MASTER_ADDR")
        else:
            try:
                addr = expand_hostlist(env[nodelist_var])[0]
            except LaunchError as exc:
                r.problems.append(f"{nodelist_var}: {exc}")
    port = _master_port(r)
    r.fail_if_any("SLURM_* variables of an srun step")
    return DistEnv(rank, local_rank, world, local_world, addr, port, "slurm")


def _single(env: Mapping[str, str]) -> DistEnv:
    r = _Reader(env)
    world = r.int("WORLD_SIZE", required=False)
    local_rank = r.int("LOCAL_RANK", required=False)
    if world not in (None, 1):
        r.problems.append(
            f"WORLD_SIZE={world} is set but RANK is not: start the ranks with torchrun, the deepspeed launcher, "
            f"mpirun or srun (or unset WORLD_SIZE for one process)"
        )
    if local_rank not in (None, 0):
        r.problems.append(f"LOCAL_RANK={local_rank} is set but no launcher variables (RANK, OMPI_*, SLURM_*) are")
    port = _master_port(r)
    r.fail_if_any("no launcher detected, so one process")
    return DistEnv(0, 0, 1, 1, env.get("MASTER_ADDR", "").strip() or LOCALHOST, port, "single")


def resolve(env: Mapping[str, str], *, mpi_master_addr: Callable[[], str] | None = None) -> DistEnv:
    """Work out rank, world and master from `env`; raise LaunchError listing every inconsistency.

    `mpi_master_addr` is called only under mpirun with more than one process and no MASTER_ADDR;
    by default it is `launcher.dist_env.mpi_master_addr` (mpi4py broadcast from rank 0).
    """
    if "RANK" in env:
        return _from_torch_env(env)
    if "OMPI_COMM_WORLD_RANK" in env:
        return _from_openmpi(env, mpi_master_addr or _broadcast_master_addr)
    if "SLURM_PROCID" in env and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env):
        return _from_slurm(env)
    return _single(env)


def export(dist: DistEnv, env: MutableMapping[str, str]) -> None:
    """Set the variables torch.distributed's env:// and deepspeed.init_distributed read."""
    env.update({
        "RANK": str(dist.rank),
        "LOCAL_RANK": str(dist.local_rank),
        "WORLD_SIZE": str(dist.world_size),
        "LOCAL_WORLD_SIZE": str(dist.local_world_size),
        "MASTER_ADDR": dist.master_addr,
        "MASTER_PORT": str(dist.master_port),
    })


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_process(env: MutableMapping[str, str]) -> DistEnv:
    """``resolve`` and ``export`` this process's rank; a lone process without MASTER_PORT gets a free
    port, so that two one-process runs on one machine do not collide. With a master on another address
    than loopback, gloo is told to use the interface on the route to it (GLOO_SOCKET_IFNAME, unless set)."""
    dist = resolve(env)
    if dist.source == "single" and "MASTER_PORT" not in env:
        dist = replace(dist, master_port=free_port())
    export(dist, env)
    if dist.world_size > 1:
        local = route_source(dist.master_addr, dist.master_port)
        if local and not local.startswith("127."):
            env.setdefault(HOST_ADDR_VAR, local)
            iface = interface_of(local, _interface_addresses())
            if iface:
                env.setdefault("GLOO_SOCKET_IFNAME", iface)
    return dist


def route_source(addr: str, port: int) -> str | None:
    """The local address this host sends from to reach `addr` (a UDP connect: no packet is sent)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((addr, port))
            return s.getsockname()[0]
    except OSError:  # unresolvable or no route: leave the choice to gloo
        return None


def interface_of(local: str, interfaces: Sequence[tuple[str, str]]) -> str | None:
    """The interface holding address `local`, for GLOO_SOCKET_IFNAME.

    Without it gloo advertises the address its host name resolves to, which on many machines (and in
    containers) is 127.0.x.1 from /etc/hosts: every rank on another host then fails to connect to it.
    """
    return next((name for name, a in interfaces if a == local), None)


def wait_for_master(addr: str, port: int, timeout_s: float) -> None:
    """Retry a TCP connect to the master's store until it answers; LaunchError after `timeout_s`.

    Called by ranks other than 0 before init_process_group, so an unreachable master fails in
    `timeout_s` with a message that names what to check instead of hanging for torch's 30 minutes.
    """
    deadline = time.monotonic() + timeout_s
    delay, last_error = 0.05, "no attempt made"
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            with socket.create_connection((addr, port), timeout=max(0.05, min(2.0, remaining))):
                return
        except TimeoutError:
            last_error = "connection timed out"
        except OSError as exc:  # refused while rank 0 starts its store, unreachable, or not resolvable
            last_error = exc.strerror or str(exc)
        time.sleep(max(0.0, min(delay, deadline - time.monotonic())))
        delay = min(delay * 2, 1.0)
    raise LaunchError(
        f"could not reach the master at {addr}:{port} within {timeout_s:g} s (last error: {last_error}). "
        f"Check that rank 0 started, that MASTER_ADDR={addr} is an address of rank 0's host reachable from "
        f"this one, that TCP port {port} is open between the hosts (security group / firewall), and that "
        f"NCCL_SOCKET_IFNAME names an interface the hosts share"
    )


# ---- the master address under mpirun, from rank 0 via mpi4py ----

def _interface_addresses() -> list[tuple[str, str]]:
    """(interface, IPv4 address) pairs of this host; Linux only, empty elsewhere."""
    try:
        import fcntl
        import struct
    except ImportError:
        return []
    found = []
    siocgifaddr = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), siocgifaddr, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue  # no IPv4 address on this interface
            found.append((name, socket.inet_ntoa(packed[20:24])))
    return found


def pick_address(interfaces: Sequence[tuple[str, str]], socket_ifname: str | None) -> str | None:
    """Choose the address peers should dial, honouring NCCL_SOCKET_IFNAME's syntax.

    `eth,ens` keeps interfaces starting with those prefixes, `^lo,docker` drops them, `=eth0` matches
    exactly. Unset: any interface except loopback and docker bridges (NCCL's own default).
    """
    spec = (socket_ifname or "").strip() or "^lo,docker"
    exclude = spec.startswith("^")
    spec = spec.lstrip("^")
    exact = spec.startswith("=")
    names = [p.strip() for p in spec.lstrip("=").split(",") if p.strip()]

    def listed(iface: str) -> bool:
        return any(iface == n if exact else iface.startswith(n) for n in names)

    for iface, addr in interfaces:
        if addr.startswith("127."):
            continue
        if listed(iface) != exclude:
            return addr
    return None


def _local_address(env: Mapping[str, str]) -> str:
    addr = pick_address(_interface_addresses(), env.get("NCCL_SOCKET_IFNAME"))
    if addr:
        return addr
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return LOCALHOST


def _import_mpi():
    if importlib.util.find_spec("mpi4py") is None:
        raise LaunchError(
            "this process was started by mpirun without MASTER_ADDR, so rank 0's address must be shared "
            "through MPI, but mpi4py is not installed: `pip install mpi4py` (it is a dependency of this "
            "project, so `pip install .` brings it), or pass -x MASTER_ADDR=<rank 0 host> -x MASTER_PORT=29500 "
            "to mpirun (`sift launch --backend mpirun` does)"
        )
    try:
        from mpi4py import MPI
    except (ImportError, OSError, RuntimeError) as exc:
        raise LaunchError(
            f"mpi4py is installed but cannot load an MPI library ({str(exc).splitlines()[0]}). Install "
            f"Open MPI (Debian/Ubuntu: apt-get install libopenmpi-dev; in the Docker image it is "
            f"/opt/amazon/openmpi) and put its lib/ on LD_LIBRARY_PATH, or pass MASTER_ADDR/MASTER_PORT "
            f"to every rank so MPI is not needed"
        ) from exc
    return MPI


def _broadcast_master_addr() -> str:
    """Rank 0's address, chosen on rank 0 and broadcast with mpi4py (the default for `resolve`)."""
    comm = _import_mpi().COMM_WORLD
    addr = _local_address(os.environ) if comm.Get_rank() == 0 else None
    return comm.bcast(addr, root=0)


mpi_master_addr = _broadcast_master_addr
