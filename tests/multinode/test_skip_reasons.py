"""Where the cluster cannot be made, the reason names what is missing (these run everywhere, no root)."""

from __future__ import annotations

from tests.multinode import cluster, slurm


def test_not_root_is_named(monkeypatch):
    monkeypatch.setattr(cluster.os, "geteuid", lambda: 1000)
    assert "network namespaces need root" in cluster.missing()


def test_missing_tools_are_named_with_their_packages(monkeypatch):
    monkeypatch.setattr(cluster.os, "geteuid", lambda: 0)
    monkeypatch.setattr(cluster.shutil, "which", lambda tool: None if tool in ("pdsh", "sshd") else f"/usr/bin/{tool}")
    monkeypatch.setattr(cluster, "SSHD", "/nonexistent/sshd")
    assert cluster.missing() == ("not installed: sshd (openssh-server), pdsh (pdsh) "
                                 "(apt-get install iproute2 openssh-server pdsh)")


def test_missing_slurm_is_named_with_its_package(monkeypatch):
    monkeypatch.setattr(slurm.shutil, "which", lambda tool: None if tool.startswith(("slurm", "s")) else f"/usr/bin/{tool}")
    assert slurm.missing_slurm() == "not installed: slurmctld, slurmd, srun, sinfo (apt-get install slurm-wlm)"
