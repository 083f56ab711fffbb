"""A minimal SLURM cluster on the test hosts: slurmctld on host 0, one slurmd per host (Debian's slurm-wlm).

    with Slurm(cluster) as slurm:                 # missing_slurm() says why it cannot run here
        slurm.nodes                               # ['n0', 'n1'], each the host name inside its daemons
        cluster.popen(0, ["srun", ...], env={**env, **slurm.env})

Each daemon runs in its host's network namespace with a host name of its own (a UTS namespace), because
slurmctld and slurmd find their node by host name. slurmd enters only the network namespace
(`nsenter --net`), not `ip netns exec`'s private /sys: slurmd 22.05 will not start without the
machine's cgroup mounts under /sys/fs/cgroup, though with proctrack/linuxproc and task/none it makes no
cgroup. No munge: auth/none and cred/none, acceptable on hosts that reach nothing but each other.
"""

from __future__ import annotations

import shutil
import subprocess
import time

from tests.multinode.cluster import Cluster, Started

DAEMONS = ("slurmctld", "slurmd", "srun", "sinfo", "nsenter", "unshare")


def missing_slurm() -> str | None:
    absent = [tool for tool in DAEMONS if shutil.which(tool) is None]
    return f"not installed: {', '.join(absent)} (apt-get install slurm-wlm)" if absent else None


class Slurm(Started):
    def __init__(self, cluster: Cluster, cpus_per_node: int = 4):
        self.cluster, self.cpus = cluster, cpus_per_node
        self.dir = cluster.root / "slurm"
        self.nodes = [f"n{i}" for i in range(cluster.n)]
        self.conf = self.dir / "slurm.conf"
        self.env = {"SLURM_CONF": str(self.conf)}
        self._daemons: list[subprocess.Popen] = []

    def _start(self, timeout_s: float = 30) -> None:
        c, d = self.cluster, self.dir
        (d / "state").mkdir(parents=True)
        nodes = "".join(f"NodeName={n} NodeAddr={a} CPUs={self.cpus} State=UNKNOWN\n"
                        for n, a in zip(self.nodes, c.addrs, strict=True))
        # config_overrides: nodes count the CPUs configured here, whatever the machine has.
        self.conf.write_text(
            f"ClusterName=sift\nSlurmctldHost={self.nodes[0]}({c.addrs[0]})\nAuthType=auth/none\nCredType=cred/none\n"
            f"SlurmUser=root\nSlurmdUser=root\nStateSaveLocation={d / 'state'}\nSlurmdSpoolDir={d}/spool-%n\n"
            f"SlurmctldPidFile={d}/slurmctld.pid\nSlurmdPidFile={d}/slurmd-%n.pid\nSlurmctldLogFile={d}/slurmctld.log\n"
            f"SlurmdLogFile={d}/slurmd-%n.log\nProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\n"
            "SwitchType=switch/none\nMpiDefault=none\nSelectType=select/cons_tres\nSelectTypeParameters=CR_CPU\n"
            "SlurmdParameters=config_overrides\nReturnToService=2\nKillWait=5\nMailProg=/bin/true\n"
            "JobCompType=jobcomp/none\nAccountingStorageType=accounting_storage/none\n"
            f"JobAcctGatherType=jobacct_gather/none\n{nodes}PartitionName=test Nodes=ALL Default=YES State=UP\n")
        for n in self.nodes:
            (d / f"spool-{n}").mkdir()
        self._daemon(0, "slurmctld -D -i", enter=["ip", "netns", "exec", c.hosts[0]])
        for i, ns in enumerate(c.hosts):
            self._daemon(i, "slurmd -D", enter=["nsenter", f"--net=/run/netns/{ns}"])
        deadline = time.monotonic() + timeout_s
        while True:
            state = subprocess.run(["ip", "netns", "exec", c.hosts[0], "sinfo", "-h", "-o", "%n %T"], capture_output=True, text=True,
                                   timeout=10, env={"PATH": "/usr/bin:/bin", **self.env})
            if state.stdout.split().count("idle") == len(self.nodes):
                return
            if time.monotonic() > deadline:
                logs = "\n".join(p.read_text()[-1000:] for p in sorted(d.glob("*.log")))
                raise RuntimeError(f"SLURM nodes not idle within {timeout_s:g} s: {state.stdout.strip()} "
                                   f"{state.stderr.strip()}\n{logs}")
            time.sleep(0.5)

    def _daemon(self, i: int, command: str, enter: list[str]) -> None:
        """`command` in host i's network namespace, under host name n<i>."""
        with open(self.dir / f"{command.split()[0]}-{i}.out", "w") as out:
            self._daemons.append(subprocess.Popen(
                [*enter, "unshare", "--uts", "sh", "-c", f"hostname {self.nodes[i]} && exec {command}"],
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **self.env}, stdout=out, stderr=subprocess.STDOUT))

    def close(self) -> None:
        for p in self._daemons:
            p.terminate()
        for p in self._daemons:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
