"""`sift launch`: print (and run) the exact multi-node command for a backend from a short description.

    sift launch --hostfile hostfile -- --config runs/bert.yaml
    sift launch --backend mpirun --hosts 'p4d-[01-02]' --gpus-per-node 8 --profile p4d -- --config ...
    sift launch --backend srun --gpus-per-node 8 --dry-run -- --config ...   # hosts from the allocation

Everything after `--` goes to the training script. The command is printed last, after `#` lines
saying which files were written (a hostfile, `.deepspeed_env`) and anything worth knowing.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from launcher.commands import (
    BACKENDS,
    BIND_MODES,
    DEFAULT_SCRIPT,
    DS_LAUNCHERS,
    INSTALLED_MODULE,
    LOCAL_HOSTS,
    LaunchPlan,
    build_command,
    is_local,
    master_addr,
)
from launcher.dist_env import DEFAULT_MASTER_PORT, route_source
from launcher.envvars import (
    DEEPSPEED_CUDA_FORWARDED_PREFIXES,
    DEEPSPEED_ENV_NAME,
    DEEPSPEED_FORWARDED_PREFIXES,
    PROFILES,
    collect_env,
    forwarded_by_deepspeed,
    mangled_by_deepspeed,
    obsolete_settings,
    render_deepspeed_env,
    write_deepspeed_env,
)
from launcher.errors import LaunchError
from launcher.hostfile import apply_filters, read_hostfile, render_hostfile
from launcher.hostlist import expand_hostlist
from launcher.preflight import check_hosts, check_port_free

GENERATED_HOSTFILE = "sift.hostfile"
# What the deepspeed runner checks for before a multi-node launch (its backend_exists()).
_NEEDS = {"pdsh": "pdsh", "openmpi": "ompi_info", "slurm": "sinfo"}
_INSTALL_HINTS = {
    "deepspeed": "pip install deepspeed (or this project: pip install .)",
    "mpirun": "install Open MPI (apt-get install openmpi-bin, or use the Docker image)",
    "ompi_info": "install Open MPI (apt-get install openmpi-bin)",
    "pdsh": "apt-get install pdsh, or use --ds-launcher openmpi/slurm or --backend mpirun",
    "sinfo": "run inside a SLURM cluster, or use another --ds-launcher",
    "srun": "run inside a SLURM allocation (salloc/sbatch)",
    "torchrun": "pip install torch",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sift launch",
        description="Build, print and run the command that starts training on one or many nodes.",
        epilog="Arguments after `--` are passed to the training script, e.g. `-- --config run.yaml`.",
    )
    p.add_argument("--backend", choices=BACKENDS, default="deepspeed", help="launcher to use (default: deepspeed)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--hostfile", help="DeepSpeed/Open MPI hostfile: one 'host slots=N' line per node")
    where.add_argument("--hosts", help="host names, comma separated; SLURM ranges like 'p4d-[01-04]' work "
                                       "(default: the SLURM allocation's nodes, else localhost)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs (processes) per host when hosts are not from a hostfile")
    filt = p.add_mutually_exclusive_group()
    filt.add_argument("--include", default="", help="deepspeed syntax: host1:0,1@host2 (only these)")
    filt.add_argument("--exclude", default="", help="deepspeed syntax: host1:0@host2 (all but these)")
    p.add_argument("--master-addr", help="rank 0's address (default: the first host)")
    p.add_argument("--master-port", type=int, default=DEFAULT_MASTER_PORT, help="rank 0's store port (default: 29500)")
    p.add_argument("--ds-launcher", choices=DS_LAUNCHERS, default="pdsh",
                   help="backend deepspeed only: how the deepspeed launcher reaches the nodes (default: pdsh)")
    p.add_argument("--profile", choices=sorted(PROFILES), default="none",
                   help="environment preset for the ranks; p4d = AWS EFA settings (FI_EFA_USE_HUGE_PAGE=0, ...)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="set a variable on every rank")
    p.add_argument("--forward", action="append", default=[], metavar="NAME",
                   help="pass this variable's current value to every rank (FI_* and NCCL_* always are)")
    p.add_argument("--bind", choices=BIND_MODES, default="none",
                   help="CPU binding for mpirun/srun: none, or numa (half the GPUs per socket, as on p4d)")
    p.add_argument("--tcp-iface", help="interface for Open MPI's own TCP traffic (default: all but lo/docker0)")
    p.add_argument("--oversubscribe", action="store_true", help="mpirun: allow more ranks than cores")
    p.add_argument("--allow-run-as-root", action="store_true", help="mpirun: allow running as root (containers, CI)")
    p.add_argument("--python", default=sys.executable, help="interpreter for mpirun/srun ranks (default: this one)")
    p.add_argument("--script", default=DEFAULT_SCRIPT, help=f"training entry point (default: {DEFAULT_SCRIPT})")
    p.add_argument("--module", action="store_true", help="--script is a module name, run with python -m")
    p.add_argument("--rdzv-id", default="sift", help="torchrun: rendezvous id shared by the nodes of one job")
    p.add_argument("--no-preflight", action="store_true",
                   help="skip the checks before starting: hosts answer ssh, slots <= GPUs, the master port is free")
    p.add_argument("--dry-run", action="store_true", help="print what would be written and run; do neither")
    return p


def _parse_env_pairs(pairs: Sequence[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise LaunchError(f"--env {pair!r}: expected KEY=VALUE")
        out[key] = value
    return out


def _host_pool(args: argparse.Namespace, environ: Mapping[str, str]) -> tuple[dict[str, int], str]:
    """{host: slots} and a word on where the hosts came from."""
    if args.hostfile:
        if args.gpus_per_node is not None:
            raise LaunchError("--gpus-per-node conflicts with --hostfile, whose slots= say how many GPUs each host has")
        return read_hostfile(args.hostfile), f"hostfile {args.hostfile}"
    if args.hosts:
        hosts, origin = expand_hostlist(args.hosts), "--hosts"
    elif environ.get("SLURM_JOB_NODELIST"):
        hosts, origin = expand_hostlist(environ["SLURM_JOB_NODELIST"]), "SLURM_JOB_NODELIST"
    else:
        hosts, origin = ["localhost"], "this machine"
    duplicates = sorted({h for h in hosts if hosts.count(h) > 1})
    if duplicates:
        raise LaunchError(f"{origin} names {', '.join(duplicates)} more than once")
    if args.gpus_per_node is None:
        raise LaunchError(f"hosts come from {origin}: say how many GPUs each has with --gpus-per-node N")
    if args.gpus_per_node < 1:
        raise LaunchError(f"--gpus-per-node {args.gpus_per_node}: must be at least 1")
    return {h: args.gpus_per_node for h in hosts}, origin


@dataclass(frozen=True)
class Prepared:
    argv: list[str]
    files: dict[str, str]  # file name (in the current directory) -> content
    notes: list[str]
    multi_node: bool  # the command reaches other machines (ssh, mpirun, srun, deepspeed's runners)
    ssh_hosts: dict[str, int]  # hosts the command reaches over ssh -> slots used there
    master: tuple[str, int] | None  # where rank 0's store will listen; None: not known here


def _deepspeed_setup(args: argparse.Namespace, pool: Mapping[str, int], resources: Mapping[str, tuple[int, ...]],
                     collected: Mapping[str, str], changed: Mapping[str, str], environ: Mapping[str, str]
                     ) -> tuple[dict, dict[str, str]]:
    """LaunchPlan fields and files for the deepspeed backend."""
    multi = not is_local(resources) or args.ds_launcher != "pdsh"
    if not multi:  # the runner launches locally and passes its own environment on
        return {"env": dict(changed), "hostfile": args.hostfile, "include": args.include,
                "exclude": args.exclude}, {}
    files: dict[str, str] = {}
    fields: dict = {}
    openmpi_filtered = args.ds_launcher == "openmpi" and bool(args.include or args.exclude)
    if args.hostfile and not openmpi_filtered:
        fields["hostfile"] = args.hostfile
    else:
        # DeepSpeed applies --include/--exclude to the whole pool itself; its openmpi runner cannot,
        # so it gets a hostfile holding only the chosen hosts and slot counts.
        chosen = resources if openmpi_filtered else {h: range(n) for h, n in pool.items()}
        files[GENERATED_HOSTFILE] = render_hostfile(chosen)
        fields["hostfile"] = GENERATED_HOSTFILE
    if not openmpi_filtered:
        fields.update(include=args.include, exclude=args.exclude)
    to_file = {k: v for k, v in collected.items() if not forwarded_by_deepspeed(k)}
    auto = {k: v for k, v in environ.items()
            if k.startswith(DEEPSPEED_FORWARDED_PREFIXES + DEEPSPEED_CUDA_FORWARDED_PREFIXES)}
    mangled = mangled_by_deepspeed({**auto, **to_file}, args.ds_launcher)
    if mangled:
        alt = "mpirun" if args.ds_launcher == "openmpi" else "srun"
        also = ", and srun splits them on commas" if alt == "srun" else ""
        raise LaunchError(
            f"deepspeed's {args.ds_launcher} runner would deliver these values altered (it wraps them in literal "
            f"double quotes{also}): {', '.join(mangled)}. Use --backend {alt}, which starts the same processes and "
            f"passes values intact, or --ds-launcher pdsh"
        )
    if to_file:
        files[environ.get("DS_ENV_FILE", DEEPSPEED_ENV_NAME)] = render_deepspeed_env(to_file)
    return fields, files


def prepare(args: argparse.Namespace, train_args: Sequence[str], environ: Mapping[str, str]) -> Prepared:
    """The command, files and notes for the parsed options; pure given `environ` and the hostfile (and, for
    torchrun on several hosts, this machine's route to the first one)."""
    pool, origin = _host_pool(args, environ)
    resources = {h: tuple(s) for h, s in apply_filters(pool, args.include, args.exclude).items()}
    collected = collect_env(environ, profile=PROFILES[args.profile], overrides=_parse_env_pairs(args.env),
                            forward=args.forward)
    # Backends that inherit the launching environment get only what differs from it.
    changed = {k: v for k, v in collected.items() if environ.get(k) != v}
    files: dict[str, str] = {}
    if args.backend == "mpirun":  # remote ranks get nothing unless exported with -x
        fields: dict = {"env": collected,
                        "pass_env": tuple(n for n in ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH") if n in environ)}
    elif args.backend == "deepspeed":
        fields, files = _deepspeed_setup(args, pool, resources, collected, changed, environ)
    else:
        fields = {"env": changed}
    if args.backend == "torchrun" and not is_local(resources):
        fields["local_addr"], fields["rdzv_host"] = _torchrun_node(args, resources)
    script, module = args.script, args.module
    if script == DEFAULT_SCRIPT and not module and not Path(script).is_file():
        script, module = INSTALLED_MODULE, True  # not in a clone: the installed package's entry point
    plan = LaunchPlan(
        resources=resources, script=script, module=module, train_args=tuple(train_args),
        master_addr=args.master_addr, master_port=args.master_port, python=args.python,
        ds_launcher=args.ds_launcher, bind=args.bind, oversubscribe=args.oversubscribe,
        allow_run_as_root=args.allow_run_as_root, tcp_iface=args.tcp_iface, rdzv_id=args.rdzv_id, **fields,
    )
    argv = build_command(args.backend, plan)
    ranks = sum(len(s) for s in resources.values())
    summary = ", ".join(f"{h}[{_slots_text(s)}]" for h, s in resources.items())
    notes = [f"{args.backend}: {ranks} rank(s) on {len(resources)} host(s) from {origin}: {summary}"]
    notes += [f"note: {line}" for line in obsolete_settings({**environ, **collected})]
    if args.backend == "torchrun" and len(resources) > 1:
        notes.append("note: run this same command on every node (e.g. srun --ntasks-per-node=1 ...)")
    multi = not is_local(resources) or args.backend == "srun" or (
        args.backend == "deepspeed" and args.ds_launcher != "pdsh")
    over_ssh = not is_local(resources) and (args.backend == "mpirun" or (
        args.backend == "deepspeed" and args.ds_launcher == "pdsh"))
    ssh_hosts = {h: len(s) for h, s in resources.items() if h not in LOCAL_HOSTS} if over_ssh else {}
    return Prepared(argv, files, notes, multi, ssh_hosts, _master(args, plan))


def _torchrun_node(args: argparse.Namespace, resources: Mapping[str, tuple[int, ...]]) -> tuple[str | None, bool | None]:
    """This node's address on the route to the rendezvous host (a UDP connect sends nothing), and whether
    it is that host; (None, None) where the route is unknown (then torchrun guesses both)."""
    endpoint = args.master_addr or next(iter(resources))
    local = route_source(endpoint, args.master_port)
    if local is None or local.startswith("127."):
        return None, None
    try:
        return local, socket.gethostbyname(endpoint) == local
    except OSError:
        return local, None


def _master(args: argparse.Namespace, plan: LaunchPlan) -> tuple[str, int] | None:
    """Where rank 0's store will listen, when this machine can know it before the launch."""
    if args.backend == "torchrun" and len(plan.resources) > 1:
        return None  # the same command runs on every node: the first one's store takes the port
    try:
        return master_addr(plan), plan.master_port
    except LaunchError:  # a first host named localhost: the backend (deepspeed) works out the address itself
        return None


def _slots_text(slots: Sequence[int]) -> str:
    """`0-7` for a contiguous run, else `0,2,5`."""
    if len(slots) > 2 and list(slots) == list(range(slots[0], slots[-1] + 1)):
        return f"{slots[0]}-{slots[-1]}"
    return ",".join(map(str, slots))


def _preflight(args: argparse.Namespace, prepared: Prepared) -> None:
    """Fail before starting anything when a needed tool or file is missing on this machine."""
    tools = [next(a for a in prepared.argv if a != "env" and "=" not in a)]
    if args.backend == "deepspeed" and prepared.multi_node:
        tools.append(_NEEDS[args.ds_launcher])
    for tool in tools:
        if shutil.which(tool) is None:
            raise LaunchError(f"{tool!r} is not on PATH: {_INSTALL_HINTS.get(tool, 'install it or fix PATH')}")
    if not args.module and args.script != DEFAULT_SCRIPT and not Path(args.script).is_file():
        raise LaunchError(f"training script {args.script!r} not found from {os.getcwd()}; run from the repository "
                          f"root, or pass --script PATH (or --script launcher.train --module)")


def _write_files(files: Mapping[str, str]) -> list[str]:
    """Write the generated files into the current directory; return notes about replaced ones."""
    notes = []
    for name, content in files.items():
        try:
            if name == GENERATED_HOSTFILE:
                Path(name).write_text(content)
                continue
            _, backup = write_deepspeed_env(content, ".", name)
        except OSError as e:
            raise LaunchError(f"cannot write {name} in {os.getcwd()}: {e.strerror or e}; run from a writable "
                              "directory (the deepspeed launcher reads it from there)") from None
        if backup:
            notes.append(f"note: the previous {name} was kept as {backup}")
    return notes


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, train_args = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    try:
        args = build_parser().parse_args(ours)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return int(exc.code or 0)
    prepared = prepare(args, train_args, os.environ)
    notes = list(prepared.notes)
    home_env = Path.home() / DEEPSPEED_ENV_NAME
    if args.backend == "deepspeed" and prepared.multi_node and home_env.is_file():
        notes.append(f"note: {home_env} exists; the deepspeed launcher applies it before ./{DEEPSPEED_ENV_NAME}")
    if not args.dry_run:
        _preflight(args, prepared)
        if not args.no_preflight:
            if prepared.ssh_hosts:
                check_hosts(prepared.ssh_hosts)
            if prepared.master:
                check_port_free(*prepared.master)
        notes += _write_files(prepared.files)
    for line in notes:
        print(f"# {line}")
    for name, content in prepared.files.items():
        print(f"# {'would write' if args.dry_run else 'wrote'} {name}:")
        print("".join(f"#   {line}\n" for line in content.splitlines()), end="")
    print(shlex.join(prepared.argv), flush=True)  # last, so it can be copied from the end of the output
    if args.dry_run:
        return 0
    code = subprocess.call(prepared.argv)
    return code if code >= 0 else 128 - code  # killed by a signal: the shell's convention


if __name__ == "__main__":
    from launcher.cli import main as sift

    sys.exit(sift(["launch", *sys.argv[1:]]))
