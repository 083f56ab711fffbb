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
