"""N test "hosts" on one machine: Linux network namespaces on a private bridge, each running its own sshd.

    with Cluster(2) as c:                       # root only; see `missing()` for what it needs
        c.addrs                                 # ['10.251.37.1', '10.251.37.2']
        c.popen(0, ["python", ...], env=...)    # a process on host 0 (ip netns exec)
        c.kill_host(1)                          # SIGKILL every process of host 1
        c.set_link(1, up=False)                 # or cut its link

Every object gets a unique prefix (`sm<pid hex><random>`), so concurrent runs never collide. The bridge
lives in a namespace of its own (the "switch"), so nothing is added to the machine's own network
namespace: the hosts reach each other and nothing else, and deleting the namespaces removes every
interface. The hosts share the file system (like a cluster with shared storage); each runs
`sshd -D` as root on port 22 of its address with a throw-away host key, accepting one key made for
this cluster. `bin/ssh` in `root` is a shim that runs ssh with this cluster's `ssh_config` (host keys
not checked for these addresses only, batch mode, keep-alives so a dead peer is noticed), so the
launchers (pdsh, the deepspeed runner, mpirun) use it when `bin` is first on PATH.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

TOOLS = {"ip": "iproute2", "sshd": "openssh-server", "ssh": "openssh-client", "ssh-keygen": "openssh-client",
         "pdsh": "pdsh"}
SSHD = "/usr/sbin/sshd"


def missing() -> str | None:
    """Why a cluster cannot be made here (None: it can): a reason naming what is missing."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root (run the multinode tests as root, as .ci/run does)"
    absent = [f"{tool} ({pkg})" for tool, pkg in TOOLS.items()
              if shutil.which(tool) is None and not (tool == "sshd" and Path(SSHD).is_file())]
    if absent:
        return f"not installed: {', '.join(absent)} (apt-get install iproute2 openssh-server pdsh)"
    probe = f"smprobe{os.getpid():x}"[:15]
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace (`ip netns add`: {made.stderr.strip()})"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _sh(*argv: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["ip", "netns", "exec", ns, *argv] if ns else list(argv)
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {result.stderr.strip()}")
    return result


def _kill_namespace(ns: str) -> int:
    """SIGKILL every process in namespace `ns`, a few rounds (processes may fork meanwhile); how many."""
    killed = 0
    for _ in range(5):
        pids = [int(p) for p in _sh("ip", "netns", "pids", ns, check=False).stdout.split()]
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
        time.sleep(0.1)
    return killed


def _free_subnet() -> int:
    """A 10.251.X.0/24 no namespace on this machine uses yet (X random, so parallel runs rarely race)."""
    used = set()
    for ns in _sh("ip", "netns", "list").stdout.split():
        if ns.startswith("sm"):
            for line in _sh("ip", "-4", "-o", "addr", ns=ns, check=False).stdout.splitlines():
                if " 10.251." in line:
                    used.add(int(line.split(" 10.251.")[1].split(".")[0]))
    free = [x for x in range(1, 255) if x not in used]
    return free[secrets.randbelow(len(free))]


class Started:
    """A context manager over ``_start()`` and ``close()``: closed on leaving, and also when starting fails
    part way (what was started is stopped)."""

    def __enter__(self):
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class Cluster(Started):
    def __init__(self, n_hosts: int, *, root: Path | None = None):
        self.n = n_hosts
        self.prefix = f"sm{os.getpid() % 0xFFFF:x}{secrets.token_hex(2)}"  # <= 10 chars: names stay < 16
        self.root = Path(root or tempfile.mkdtemp(prefix=f"{self.prefix}-"))
        self.switch = f"{self.prefix}sw"
        self.hosts = [f"{self.prefix}h{i}" for i in range(n_hosts)]
        self.addrs: list[str] = []
        self._sshd: list[subprocess.Popen] = []

    # ------------------------------------------------------------------ setup / teardown
    def _start(self) -> None:
        subnet = _free_subnet()
        self.addrs = [f"10.251.{subnet}.{i + 1}" for i in range(self.n)]
        _sh("ip", "netns", "add", self.switch)
        _sh("ip", "link", "add", "br0", "type", "bridge", ns=self.switch)
        _sh("ip", "link", "set", "br0", "up", ns=self.switch)
        for i, (ns, addr) in enumerate(zip(self.hosts, self.addrs, strict=True)):
            _sh("ip", "netns", "add", ns)
            port, peer = f"{self.prefix}p{i}", f"{self.prefix}e{i}"
            # Made in the switch namespace, so the pair never appears in the machine's own.
            _sh("ip", "link", "add", port, "type", "veth", "peer", "name", peer, ns=self.switch)
            _sh("ip", "link", "set", peer, "netns", ns, ns=self.switch)
            _sh("ip", "link", "set", port, "master", "br0", "up", ns=self.switch)
            _sh("ip", "link", "set", peer, "name", "eth0", ns=ns)
            _sh("ip", "addr", "add", f"{addr}/24", "dev", "eth0", ns=ns)
            _sh("ip", "link", "set", "eth0", "up", ns=ns)
            _sh("ip", "link", "set", "lo", "up", ns=ns)
        self._make_ssh()
        for i in range(self.n):
            self._start_sshd(i)
        for i in range(self.n):
            self._wait_for_sshd(i)

    def _wait_for_sshd(self, i: int, timeout_s: float = 20) -> None:
        deadline = time.monotonic() + timeout_s
        while (answer := self.ssh(i, "true", check=False)).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"sshd on {self.addrs[i]} did not answer within {timeout_s:g} s: "
                                   f"{answer.stderr.strip()}")
            time.sleep(0.2)

    def _make_ssh(self) -> None:
        d = self.root / "ssh"
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o700)
        for name in ("host_key", "user_key"):
            _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{self.prefix}-{name}", "-f", str(d / name))
        (d / "authorized_keys").write_text((d / "user_key.pub").read_text())
        os.chmod(d / "authorized_keys", 0o600)
        subnet = self.addrs[0].rsplit(".", 1)[0]
        (d / "ssh_config").write_text(
            f"Host {subnet}.*\n"
            "  User root\n"
            f"  IdentityFile {d / 'user_key'}\n"
            "  IdentitiesOnly yes\n"
            "  StrictHostKeyChecking no\n"
            "  UserKnownHostsFile /dev/null\n"
            "  LogLevel ERROR\n"
            "  BatchMode yes\n"
            "  ConnectTimeout 5\n"
            "  ServerAliveInterval 2\n"
            "  ServerAliveCountMax 3\n"
        )
        bin_dir = self.root / "bin"
        bin_dir.mkdir(exist_ok=True)
        real_ssh = shutil.which("ssh") or "/usr/bin/ssh"
        shim = bin_dir / "ssh"
        shim.write_text(f'#!/bin/sh\nexec {real_ssh} -F {d / "ssh_config"} "$@"\n')
        shim.chmod(0o755)
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory

    def _start_sshd(self, i: int) -> None:
        d = self.root / "ssh"
        cfg = d / f"sshd_{i}.conf"
        cfg.write_text(
            f"ListenAddress {self.addrs[i]}\nPort 22\nHostKey {d / 'host_key'}\n"
            f"AuthorizedKeysFile {d / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
            f"PidFile {d / f'sshd_{i}.pid'}\nAcceptEnv LANG LC_*\nPermitUserEnvironment no\nMaxStartups 100\n"
            "MaxSessions 100\n"
        )
        log = open(d / f"sshd_{i}.log", "ab")  # noqa: SIM115 - closed with the process
        self._sshd.append(subprocess.Popen(["ip", "netns", "exec", self.hosts[i], SSHD, "-D", "-e", "-f", str(cfg)],
                                           stdout=log, stderr=subprocess.STDOUT))
        log.close()

    def kill_host(self, i: int) -> int:
        """SIGKILL every process in host i's namespace (its sshd, shells and ranks): the node is gone."""
        return _kill_namespace(self.hosts[i])

    def set_link(self, i: int, up: bool) -> None:
        """Pull (False) or plug back (True) host i's cable: its port on the switch goes down or up. Its
        processes live on, and TCP to and from it goes silent rather than being reset."""
        _sh("ip", "link", "set", f"{self.prefix}p{i}", "up" if up else "down", ns=self.switch)

    def processes(self, i: int) -> list[str]:
        """The command lines of host i's processes, its sshd's excepted."""
        found = []
        for pid in _sh("ip", "netns", "pids", self.hosts[i], check=False).stdout.split():
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                if argv and not argv.startswith((SSHD, "sshd:")):
                    found.append(argv)
        return found

    def restart_sshd(self, i: int) -> None:
        """Boot host i again after `kill_host`: a fresh sshd on its address."""
        self._start_sshd(i)
        self._wait_for_sshd(i)

    def close(self) -> None:
        for ns in [*self.hosts, self.switch]:
            if ns in _sh("ip", "netns", "list", check=False).stdout.split():
                _kill_namespace(ns)
                _sh("ip", "netns", "del", ns, check=False)
        for p in self._sshd:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------------ using it
    @property
    def path_dir(self) -> str:
        """Put first on PATH so that ssh (and pdsh, mpirun, the deepspeed runner through it) uses this cluster."""
        return str(self.root / "bin")

    def ssh(self, i: int, command: str, *, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        """`ssh host_i command`, from host 0's namespace (the machine's own has no route to the hosts,
        and must never try: its default route leads off this machine)."""
        result = subprocess.run(["ip", "netns", "exec", self.hosts[0], str(self.root / "bin" / "ssh"), self.addrs[i],
                                 command], capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"ssh {self.addrs[i]} {command!r}: {result.stderr.strip()}")
        return result

    def popen(self, i: int, argv: list[str], **kwargs) -> subprocess.Popen:
        """A process on host i (what a user gets after logging in there), kwargs as for Popen."""
        return subprocess.Popen(["ip", "netns", "exec", self.hosts[i], *argv], **kwargs)

    @staticmethod
    def free_port() -> int:
        """A port nothing listens on in a host namespace (they hold nothing but sshd on 22)."""
        return 20000 + secrets.randbelow(10000)
