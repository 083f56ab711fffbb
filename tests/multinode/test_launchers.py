"""Two hosts x 2 ranks through each launcher (deepspeed over pdsh, mpirun, torchrun, srun), as a user types
it, train exactly like one host x 4 ranks; a host lost mid-run (killed, or its link cut during a save)
stops the survivors with one line and a relaunch resumes; bad hosts are caught before any rank starts.
Hosts are network namespaces with their own sshd (tests/multinode/cluster.py) and, for srun, slurmd."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine import checkpoint as ckpt
from tests.distributed.common import REPO
from tests.multinode.conftest import finish, launch_env, start
from tests.multinode.slurm import Slurm, missing_slurm
from tests.runs import TINY_RUN, losses

pytestmark = [pytest.mark.multinode, pytest.mark.dist, pytest.mark.slow]

RUN_TIMEOUT_S = 300
# A SIFT run (top-k at exit 1 from step 3 on) short enough for 4 CPU ranks on 2 cores.
TRAIN = ["model.dropout=0.0", "train.steps=6", "train.eval_every=6", "train.save_every=3", "sift.fidelity_every=0",
         "train.plugins=[tests.multinode.probe]"]
SIFT_LAUNCH = [sys.executable, "-m", "launcher.cli", "launch"]


def training_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", str(TINY_RUN), f"data.path={data}", f"train.out_dir={out}", *TRAIN, *extra]


def launch_args(work: Path, port: int) -> list[str]:
    """What every launch here adds: the p4d profile and the probe's directory must reach every rank."""
    return ["--master-port", str(port), "--profile", "p4d", "--forward", "DS_ACCELERATOR", "--forward",
            "OMP_NUM_THREADS", "--forward", "TORCH_EXTENSIONS_DIR", "--env", f"SIFT_PROBE_DIR={work / 'probe'}",
            "--script", str(REPO / "launcher" / "train.py")]


def workdir(tmp_path: Path) -> Path:
    (tmp_path / "probe").mkdir()
    return tmp_path


def run(cluster, host: int, argv: list[str], work: Path, **env: str) -> tuple[int, str]:
    log = work / f"launch-{len(list(work.glob('launch-*.log')))}.log"
    proc = start(cluster, host, argv, work, launch_env(cluster, **env), log)
    (code,) = finish(cluster, [proc], [log], RUN_TIMEOUT_S)
    return code, log.read_text()


def steps(out: Path) -> list[tuple]:
    """Per step: (step, loss, back-propagated samples, scored samples), as rank 0 logged them."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: (r["step"], r["loss"], r["backprop_samples"], r["scored_samples"])
               for r in records if "event" not in r}
    return [by_step[s] for s in sorted(by_step)]


def assert_same_run(out: Path, reference: Path) -> None:
    got, want = steps(out), steps(reference)
    assert [s[0] for s in got] == [s[0] for s in want]
    assert [s[2:] for s in got] == [s[2:] for s in want]  # the same rows drawn, scored and trained
    assert losses(out) == pytest.approx(losses(reference), rel=1e-5, abs=1e-6)


def probes(work: Path) -> dict[int, dict]:
    return {int(p.stem.removeprefix("rank")): json.loads(p.read_text()) for p in (work / "probe").glob("rank*.json")}


def assert_ran_across(cluster, work: Path) -> None:
    """Ranks 0-1 on the first host, 2-3 on the second, all given the first host's address as master, and
    the launching shell's settings delivered to the remote ranks too."""
    seen = probes(work)
    assert sorted(seen) == [0, 1, 2, 3]
    for rank, probe in seen.items():
        assert probe["addrs"] == [cluster.addrs[rank // 2]], (rank, probe)
        assert probe["env"]["MASTER_ADDR"] == cluster.addrs[0], (rank, probe)
        assert probe["env"]["FI_EFA_USE_HUGE_PAGE"] == "0" and probe["env"]["DS_ACCELERATOR"] == "cpu", (rank, probe)


@pytest.fixture(scope="module")
def one_host(cluster, tiny_data, tmp_path_factory) -> Path:
    """The reference: the same run as 4 ranks on one host (the deepspeed launcher, loopback)."""
    work = workdir(tmp_path_factory.mktemp("one-host"))
    argv = [*SIFT_LAUNCH, "--hosts", "localhost", "--gpus-per-node", "4", *launch_args(work, cluster.free_port()),
            "--", *training_args(tiny_data, work / "out")]
    code, output = run(cluster, 0, argv, work)
    assert code == 0, output[-5000:]
    return work / "out"


def test_mpirun(cluster, one_host, tiny_data, tmp_path):
    work = workdir(tmp_path)
    argv = [*SIFT_LAUNCH, "--backend", "mpirun", "--hosts", ",".join(cluster.addrs), "--gpus-per-node", "2",
            "--oversubscribe", "--allow-run-as-root", "--python", sys.executable, *launch_args(work, cluster.free_port()),
            "--", *training_args(tiny_data, work / "out")]
    code, output = run(cluster, 0, argv, work)
    assert code == 0, output[-5000:]
    assert_ran_across(cluster, work)
    assert_same_run(work / "out", one_host)


def test_torchrun_c10d_rendezvous_on_the_first_host(cluster, one_host, tiny_data, tmp_path):
    """The printed torchrun command, run on each host (as `sift launch` says to)."""
    work = workdir(tmp_path)
    argv = [*SIFT_LAUNCH, "--backend", "torchrun", "--hosts", ",".join(cluster.addrs), "--gpus-per-node", "2",
            "--rdzv-id", f"sift-{cluster.prefix}", *launch_args(work, cluster.free_port()),
            "--", *training_args(tiny_data, work / "out")]
    env = launch_env(cluster, SIFT_PROBE_DIR=str(work / "probe"), FI_EFA_USE_HUGE_PAGE="0")
    logs = [work / f"host{i}.log" for i in range(2)]
    procs = [start(cluster, i, argv, work, env, logs[i]) for i in range(2)]
    codes = finish(cluster, procs, logs, RUN_TIMEOUT_S)
    assert codes == [0, 0], "\n".join(log.read_text()[-3000:] for log in logs)
    assert_ran_across(cluster, work)
    assert_same_run(work / "out", one_host)


def test_srun(cluster, one_host, tiny_data, tmp_path):
    """`sift launch --backend srun` outside an allocation (srun makes one), with slurmctld on the first
    host and a slurmd on each; the master is given as an address (the node names resolve nowhere)."""
    reason = missing_slurm()
    if reason:
        pytest.skip(f"multinode srun: {reason}")
    work = workdir(tmp_path)
    with Slurm(cluster) as slurm:
        argv = [*SIFT_LAUNCH, "--backend", "srun", "--hosts", ",".join(slurm.nodes), "--gpus-per-node", "2",
                "--master-addr", cluster.addrs[0], "--python", sys.executable, *launch_args(work, cluster.free_port()),
                "--", *training_args(tiny_data, work / "out")]
        code, output = run(cluster, 0, argv, work, **slurm.env)
    assert code == 0, output[-5000:]
    assert_ran_across(cluster, work)
    assert_same_run(work / "out", one_host)


COLLECTIVE_TIMEOUT_S = 30  # how long a survivor waits for a silent host (train.collective_timeout_s)
# How host 1 is lost, and when: (what pauses every rank, the step the survivors report).
LOSSES = {
    # every process of host 1 killed (sshd, shells, ranks) once the step-3 checkpoint is complete
    "killed-after-a-save": ("checkpoint_complete:3", 3),
    # host 1's link cut while the step-6 checkpoint is being written (DeepSpeed's files there, ours not)
    "cut-off-during-a-save": ("checkpoint_files_written:6", 6),
}


@pytest.mark.parametrize("loss", list(LOSSES))
def test_deepspeed_launcher_over_pdsh_loses_a_host_and_resumes(cluster, one_host, tiny_data, tmp_path, loss):
    """`sift launch --hostfile` (the deepspeed launcher over pdsh/ssh). Every rank pauses at a known point;
    host 1 is lost meanwhile: ranks 0-1 must fail at their next collective with one line naming the host
    and ranks they lost (at once for a killed host, after train.collective_timeout_s for a silent one), the
    launcher must exit non-zero, the step-3 checkpoint must be the latest complete one (a save cut short
    is never complete), and the same command, run again, must finish the run exactly as one host with 4
    ranks ran it (steps 4-6 again). One test for both launcher and loss, to spend fewer 4-rank launches."""
    pause, lost_at = LOSSES[loss]
    work = workdir(tmp_path)
    (work / "hostfile").write_text("".join(f"{a} slots=2\n" for a in cluster.addrs))
    argv = [*SIFT_LAUNCH, "--hostfile", str(work / "hostfile"), *launch_args(work, cluster.free_port()),
            "--env", f"SIFT_PAUSE_AT={pause}", "--", *training_args(tiny_data, work / "out"),
            f"train.collective_timeout_s={COLLECTIVE_TIMEOUT_S}"]
    log = work / "lost.log"
    proc = start(cluster, 0, argv, work, launch_env(cluster), log)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while len(list((work / "probe").glob("paused-rank*"))) < 4:
        if proc.poll() is not None or time.monotonic() > deadline:
            finish(cluster, [proc], [log], 1)
            pytest.fail(f"the ranks never paused at {pause}:\n{log.read_text()[-5000:]}")
        time.sleep(0.2)
    assert_ran_across(cluster, work)
    cut = loss.startswith("cut")
    try:
        if cut:
            cluster.set_link(1, up=False)
        else:
            assert cluster.kill_host(1) > 0
        released = time.monotonic()
        (work / "probe" / "release").touch()
        detected = None  # when the first survivor's error line appeared
        while proc.poll() is None and time.monotonic() - released < 120:
            if detected is None and "sift train: error: " in log.read_text():
                detected = time.monotonic() - released
            time.sleep(0.2)
        (code,) = finish(cluster, [proc], [log], 1)
        took = time.monotonic() - released
    finally:
        if cut:
            cluster.set_link(1, up=True)
        else:
            cluster.restart_sshd(1)  # host 1 boots again, for the relaunch and the tests after this one
    output = log.read_text()
    print(f"{loss}: first survivor's error line after {detected or float('nan'):.1f} s, launcher exited {code} "
          f"after {took:.1f} s (from the moment the paused ranks were released)")
    assert code != 0
    # Each survivor names the peer it lost (a survivor may see its local neighbour exit first).
    errors = [line for line in output.splitlines() if "error: " in line]
    assert errors and all(re.search(rf"sift train: error: rank [01] of 4 lost (host .*|a peer) at step {lost_at}: ", e)
                          for e in errors), output[-5000:]
    assert any(f"lost host {cluster.addrs[1]} (rank 2, 3) at step {lost_at}" in e for e in errors), output[-5000:]
    if cut:
        assert f"no answer within {COLLECTIVE_TIMEOUT_S} s (train.collective_timeout_s)" in output
        # Cut off from the master, host 1's ranks time out too, and end; the cable back, nothing is left there.
        ended = time.monotonic() + 60
        while cluster.processes(1) and time.monotonic() < ended:
            time.sleep(0.5)
        assert not cluster.processes(1), cluster.processes(1)
    checkpoints = work / "out" / "checkpoints"
    assert ckpt.find_latest(checkpoints) == "step00000003"
    if lost_at == 6:  # the save really was cut short: DeepSpeed's files there, no manifest
        assert (checkpoints / "step00000006").is_dir() and not (checkpoints / "step00000006" / ckpt.STATE_FILE).exists()

    argv[argv.index(f"SIFT_PAUSE_AT={pause}")] = "SIFT_PAUSE_AT=none"
    code, output = run(cluster, 0, argv, work)
    assert code == 0, output[-5000:]
    assert f"resumed from {checkpoints / 'step00000003'} at step 3" in output
    assert_same_run(work / "out", one_host)  # steps 4-6 again draw the rows the uninterrupted run drew


def test_bad_hosts_fail_before_any_rank_starts(cluster, tiny_data, tmp_path):
    """A host that does not answer ssh, and a master port already taken: one line each, nothing started."""
    work = workdir(tmp_path)
    silent = cluster.addrs[0].rsplit(".", 1)[0] + ".99"  # in the cluster's subnet, no host there
    (work / "hostfile").write_text("".join(f"{a} slots=2\n" for a in [*cluster.addrs, silent]))
    train = ["--", *training_args(tiny_data, work / "out")]
    code, output = run(cluster, 0, [*SIFT_LAUNCH, "--hostfile", str(work / "hostfile"),
                                    *launch_args(work, cluster.free_port()), *train], work)
    assert code == 2, output
    assert f"host {silent} does not answer ssh" in output
    assert not any(f"host {a} " in output for a in cluster.addrs)  # the good hosts are not blamed
    assert "deepspeed" not in output.split("error:")[0]  # no command was run

    port = cluster.free_port()
    holder = cluster.popen(0, [sys.executable, "-c", f"import socket, time; s = socket.create_server(('{cluster.addrs[0]}', "
                                                     f"{port})); print('ready', flush=True); time.sleep(120)"],
                           stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        (work / "hostfile").write_text("".join(f"{a} slots=2\n" for a in cluster.addrs))
        code, output = run(cluster, 0, [*SIFT_LAUNCH, "--hostfile", str(work / "hostfile"), *launch_args(work, port),
                                        *train], work)
    finally:
        holder.kill()
        holder.wait()
    assert code == 2, output
    assert f"port {port} on the master {cluster.addrs[0]} is already in use" in output
    assert not (work / "out").exists()

