"""`sift launch` end to end through `launcher.cli.main`: what it prints, writes, runs, and refuses."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

import pytest

import launcher.launch as launch
from launcher.cli import main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No launcher or fabric variables from the machine running the tests; work in a temp dir."""
    for key in list(os.environ):
        if key.startswith(("FI_", "NCCL_", "SLURM_", "OMPI_", "MASTER_", "DS_ENV_FILE")):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


def run(capsys, *argv: str) -> tuple[int, list[str], str]:
    code = main(["launch", *argv])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err


def test_dry_run_deepspeed_prints_files_and_the_command_last(capsys, tmp_path):
    (tmp_path / "hostfile").write_text("p4d-1 slots=8\np4d-2 slots=8\n")
    code, lines, err = run(capsys, "--hostfile", "hostfile", "--exclude", "p4d-2:7", "--profile", "p4d",
                           "--dry-run", "--", "--config", "run.yaml", "train.steps=10")
    assert (code, err) == (0, "")
    assert lines[0] == "# deepspeed: 15 rank(s) on 2 host(s) from hostfile hostfile: p4d-1[0-7], p4d-2[0-6]"
    assert lines[1:4] == ["# would write .deepspeed_env:", "#   FI_EFA_USE_HUGE_PAGE=0", "#   NCCL_SOCKET_IFNAME=^lo,docker"]
    # Outside a clone (here: an empty directory) the installed package's entry point runs as a module.
    assert shlex.split(lines[-1]) == ["deepspeed", "--hostfile", "hostfile", "--exclude", "p4d-2:7", "--master_port",
                                      "29500", "--module", "launcher.train", "--config", "run.yaml", "train.steps=10"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hostfile"]  # a dry run writes nothing


def test_dry_run_mpirun_with_slurm_style_hosts_and_shell_settings(capsys, monkeypatch):
    monkeypatch.setenv("NCCL_DEBUG", "INFO")
    code, lines, _ = run(capsys, "--backend", "mpirun", "--hosts", "p4d-[01-02]", "--gpus-per-node", "8",
                         "--python", "python3", "--allow-run-as-root", "--dry-run", "--", "--config", "a.yaml")
    argv = shlex.split(lines[-1])
    assert code == 0 and argv[:5] == ["mpirun", "-np", "16", "-H", "p4d-01:8,p4d-02:8"]
    assert "--allow-run-as-root" in argv and "--oversubscribe" not in argv
    assert {"MASTER_ADDR=p4d-01", "MASTER_PORT=29500", "NCCL_DEBUG=INFO"} <= set(argv)
    assert argv[-6:] == ["python3", "-u", "-m", "launcher.train", "--config", "a.yaml"]


def test_in_a_clone_the_script_path_runs(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    code, lines, _ = run(capsys, "--backend", "mpirun", "--hosts", "p4d-1", "--gpus-per-node", "8", "--python", "python",
                         "--dry-run",
                         "--", "--config", "a.yaml")
    assert code == 0 and shlex.split(lines[-1])[-5:] == ["python", "-u", "launcher/train.py", "--config", "a.yaml"]


def test_srun_takes_hosts_from_the_allocation(capsys, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[3-4]")
    code, lines, _ = run(capsys, "--backend", "srun", "--gpus-per-node", "4", "--python", "python", "--dry-run")
    assert code == 0 and "from SLURM_JOB_NODELIST" in lines[0]
    assert shlex.split(lines[-1])[:12] == ["env", "MASTER_ADDR=gpu3", "MASTER_PORT=29500", "srun", "--nodes", "2",
                                           "--ntasks-per-node", "4", "--nodelist", "gpu3,gpu4",
                                           "--kill-on-bad-exit=1", "--cpu-bind=none"]


def test_obsolete_settings_get_a_note(capsys, monkeypatch):
    monkeypatch.setenv("FI_EFA_USE_DEVICE_RDMA", "1")
    code, lines, _ = run(capsys, "--backend", "torchrun", "--gpus-per-node", "2", "--dry-run")
    assert code == 0 and any(line.startswith("# note: FI_EFA_USE_DEVICE_RDMA=1 is obsolete") for line in lines)


@pytest.mark.parametrize(
    ("argv", "hostfile", "fragment"),
    [
        (["--hostfile", "hf"], "a slots=8\nb\n", "hf:2: host 'b' has no slots"),
        (["--hostfile", "hf"], "a slots=8\na slots=8\n", "hf:2: host 'a' is listed again"),
        (["--hostfile", "missing"], None, "cannot read hostfile 'missing'"),
        (["--hosts", "a,b"], None, "--gpus-per-node N"),
        (["--hosts", "a,a", "--gpus-per-node", "1"], None, "names a more than once"),
        (["--gpus-per-node", "2", "--env", "NOVALUE"], None, "--env 'NOVALUE': expected KEY=VALUE"),
        (["--hosts", "a,b", "--gpus-per-node", "8", "--include", "c"], None, "host 'c', which is not in the host list"),
        (["--hosts", "a,b", "--gpus-per-node", "8", "--ds-launcher", "openmpi", "--profile", "p4d"], None,
         "would deliver these values altered"),
        (["--backend", "srun", "--hosts", "a,b", "--gpus-per-node", "8", "--include", "a:0,1@b"], None,
         "srun starts the same number of processes on every node"),
    ],
)
def test_user_errors_print_one_message_and_return_2(capsys, tmp_path, argv, hostfile, fragment):
    if hostfile is not None:
        (tmp_path / "hf").write_text(hostfile)
    code, lines, err = run(capsys, *argv, "--dry-run")
    assert code == 2 and lines == []
    assert err.startswith("sift launch: error: ") and fragment in err and "Traceback" not in err


def test_usage_errors_and_help_come_from_argparse(capsys):
    assert main(["launch", "--backend", "ray"]) == 2
    assert "invalid choice: 'ray'" in capsys.readouterr().err
    assert main(["launch", "--help"]) == 0
    assert "--gpus-per-node" in capsys.readouterr().out


@pytest.fixture
def preflights(monkeypatch) -> list[tuple]:
    """The pre-flight checks a real launch makes, recorded instead of run (they would ssh and connect)."""
    calls: list[tuple] = []
    monkeypatch.setattr(launch, "check_hosts", lambda slots: calls.append(("ssh", dict(slots))))
    monkeypatch.setattr(launch, "check_port_free", lambda host, port: calls.append(("port", host, port)))
    return calls


def test_a_real_run_writes_files_then_calls_the_command(capsys, monkeypatch, tmp_path, preflights):
    calls = []
    monkeypatch.setattr(launch.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    monkeypatch.setattr(launch.subprocess, "call", lambda argv: calls.append(argv) or 0)
    (tmp_path / "launcher").mkdir()
    (tmp_path / "launcher" / "train.py").write_text("")
    (tmp_path / ".deepspeed_env").write_text("OLD=1\n")
    code, lines, _ = run(capsys, "--hosts", "n1,n2", "--gpus-per-node", "2", "--env", "FI_LOG_LEVEL=warn")
    assert code == 0 and calls == [shlex.split(lines[-1])]
    assert (tmp_path / "sift.hostfile").read_text() == "n1 slots=2\nn2 slots=2\n"
    assert (tmp_path / ".deepspeed_env").read_text() == "FI_LOG_LEVEL=warn\n"
    assert (tmp_path / ".deepspeed_env.bak").read_text() == "OLD=1\n"
    assert preflights == [("ssh", {"n1": 2, "n2": 2}), ("port", "n1", 29500)]
    assert main(["launch", "--no-preflight", "--hosts", "n1,n2", "--gpus-per-node", "2"]) == 0
    assert len(preflights) == 2


def test_an_unwritable_directory_stops_before_running(capsys, monkeypatch, tmp_path, preflights):
    monkeypatch.setattr(launch.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    monkeypatch.setattr(launch.subprocess, "call", lambda argv: pytest.fail("must not run"))

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(launch, "write_deepspeed_env", read_only)
    (tmp_path / "launcher").mkdir()
    (tmp_path / "launcher" / "train.py").write_text("")
    code, _, err = run(capsys, "--hosts", "n1,n2", "--gpus-per-node", "2", "--env", "FI_LOG_LEVEL=warn")
    assert code == 2 and f"cannot write .deepspeed_env in {tmp_path}: Permission denied; run from a writable" in err


def test_a_missing_tool_or_script_stops_before_running(capsys, monkeypatch):
    monkeypatch.setattr(launch.shutil, "which", lambda tool: None if tool == "pdsh" else f"/usr/bin/{tool}")
    monkeypatch.setattr(launch.subprocess, "call", lambda argv: pytest.fail("must not run"))
    code, _, err = run(capsys, "--hosts", "n1,n2", "--gpus-per-node", "2")
    assert code == 2 and "'pdsh' is not on PATH: apt-get install pdsh" in err
    code, _, err = run(capsys, "--backend", "torchrun", "--gpus-per-node", "2", "--script", "mine/train.py")
    assert code == 2 and "training script 'mine/train.py' not found" in err


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="Open MPI (mpirun) not installed")
def test_mpirun_backend_starts_ranks_that_resolve_their_place(capfd, monkeypatch, tmp_path):
    """Two real processes: sift's mpirun command, then rank discovery inside each (no training)."""
    probe = tmp_path / "probe.py"
    probe.write_text(  # one file per rank: mpirun may interleave the ranks' stdout
        "import os, sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from launcher.dist_env import resolve\n"
        "d = resolve(os.environ)\n"
        f"open({str(tmp_path)!r} + f'/rank{{d.rank}}', 'w').write(\n"
        "    f'{d.rank}/{d.world_size} {d.local_rank}/{d.local_world_size} {d.master_addr}:{d.master_port} '\n"
        "    f'{d.source} {os.environ[\"FI_EFA_USE_HUGE_PAGE\"]}')\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    code = main(["launch", "--backend", "mpirun", "--gpus-per-node", "2", "--oversubscribe", "--allow-run-as-root",
                 "--profile", "p4d", "--master-port", "29611", "--script", str(probe), "--python", sys.executable])
    assert code == 0, capfd.readouterr()
    got = [(tmp_path / f"rank{r}").read_text() for r in (0, 1)]
    assert got == [f"{r}/2 {r}/2 127.0.0.1:29611 openmpi 0" for r in (0, 1)]


PROBE = (  # a stand-in for launcher/train.py: where am I, what did I get? (no training)
    "import os, sys\n"
    "sys.path.insert(0, {repo!r})\n"
    "from launcher.dist_env import resolve\n"
    "d = resolve(os.environ)\n"
    "open({out!r} + f'/rank{{d.rank}}', 'w').write(\n"
    "    f'{{d.rank}}/{{d.world_size}} {{d.source}} {{d.master_addr}} {{os.environ.get(\"FI_EFA_USE_HUGE_PAGE\")}} '\n"
    "    + ' '.join(a for a in sys.argv[1:] if not a.startswith('--local_rank')))\n"
)


@pytest.mark.dist
@pytest.mark.parametrize("ds_launcher", ["pdsh", "openmpi"])
def test_deepspeed_backend_starts_two_ranks_on_this_machine(capfd, monkeypatch, tmp_path, ds_launcher):
    """The printed deepspeed command, run by the installed deepspeed launcher: locally (pdsh runner
    not needed for one host) and through its openmpi runner (mpirun)."""
    pytest.importorskip("deepspeed")
    if ds_launcher == "openmpi" and shutil.which("ompi_info") is None:
        pytest.skip("Open MPI not installed")
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    (tmp_path / "probe.py").write_text(PROBE.format(repo=str(REPO), out=str(tmp_path)))
    extra = ["--allow-run-as-root", "--oversubscribe"] if ds_launcher == "openmpi" else []
    code = main(["launch", "--hosts", "localhost", "--gpus-per-node", "2", "--ds-launcher", ds_launcher,
                 "--master-port", "29612", "--env", "FI_EFA_USE_HUGE_PAGE=0", *extra, "--script", "probe.py",
                 "--", "--config", "x.yaml"])
    assert code == 0, capfd.readouterr()
    source = "deepspeed" if ds_launcher == "pdsh" else "openmpi"
    assert [(tmp_path / f"rank{r}").read_text() for r in (0, 1)] == [
        f"{r}/2 {source} 127.0.0.1 0 --config x.yaml" for r in (0, 1)]
