"""The SLURM batch scripts: valid bash, shellcheck-clean, p4d settings in sync with the profile."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from launcher.envvars import OBSOLETE_SETTINGS, P4D_ENV

SCRIPTS = sorted((Path(__file__).resolve().parents[2] / "launcher" / "slurm").glob("*.sbatch"))


def sbatch_options(text: str) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, re.M))


def test_both_layouts_are_shipped():
    assert {p.name for p in SCRIPTS} == {"p4d_srun.sbatch", "p4d_deepspeed.sbatch"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_is_valid_bash_and_exports_the_p4d_profile(script):
    text = script.read_text()
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    exported = dict(re.findall(r'^export (\w+)="?([^"\n]*)"?$', text, re.M))
    assert {k: exported.get(k) for k in P4D_ENV} == P4D_ENV
    assert not set(exported) & set(OBSOLETE_SETTINGS)
    opts = sbatch_options(text)
    assert "exclusive" in opts and int(opts["nodes"]) >= 1
    assert "launcher/train.py" in text and "--kill-on-bad-exit=1" in text


def test_task_layouts():
    by_name = {p.name: sbatch_options(p.read_text()) for p in SCRIPTS}
    assert by_name["p4d_srun.sbatch"]["ntasks-per-node"] == "8"  # one task per GPU
    assert by_name["p4d_deepspeed.sbatch"]["ntasks-per-node"] == "1"  # one launcher per node
    assert "--no_ssh --node_rank" in (SCRIPTS[0].parent / "p4d_deepspeed.sbatch").read_text()


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (apt-get install shellcheck)")
def test_shellcheck_clean():
    proc = subprocess.run(["shellcheck", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_ask_for_the_early_warning_and_requeue(script):
    from engine.config import TrainConfig
    from engine.stopping import PREEMPTED_EXIT

    opts, text = sbatch_options(script.read_text()), script.read_text()
    assert opts["signal"] == "B:USR1@120" and "requeue" in opts
    assert f"$status -eq {PREEMPTED_EXIT} ]]" in text and 'scontrol requeue "$SLURM_JOB_ID"' in text
    assert "SIGUSR1" in TrainConfig().stop_signals


def test_srun_script_passes_the_warning_on_and_requeues_on_75(tmp_path):
    """The batch script under fake srun/scontrol: USR1 to the script reaches the job step, whose exit 75
    makes the script requeue the job and exit 75 itself."""
    import os
    import signal
    import time

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/bash\ntrap 'echo got-usr1 >> \"$FAKE_LOG.srun\"; exit 75' USR1\n"
                                  'echo started > "$FAKE_LOG.srun"\nsleep 20 & wait\n')
    (bin_dir / "scontrol").write_text('#!/bin/bash\nif [[ $1 == show ]]; then echo node1; else echo "$@" >> "$FAKE_LOG"; fi\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(tmp_path / "log"),
           "SLURM_JOB_NODELIST": "node1", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_ID": "42",
           "SLURM_SUBMIT_DIR": str(tmp_path)}
    proc = subprocess.Popen(["bash", str(SCRIPTS[0].parent / "p4d_srun.sbatch"), "--config", "x"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 20
    while not (tmp_path / "log.srun").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 75, out
    assert "got-usr1" in (tmp_path / "log.srun").read_text()
    assert (tmp_path / "log").read_text().split() == ["requeue", "42"]
    assert "requeueing job 42" in out
