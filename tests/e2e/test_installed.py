"""The package works outside the repository: a wheel of the project, installed without dependencies
into a temporary target next to this environment's packages, runs `sift demo` from an empty directory
(shipped configs and DeepSpeed JSONs are package data; outputs land under the current directory)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.distributed.common import REPO, single_env


@pytest.mark.slow
def test_wheel_installed_elsewhere_runs_the_demo(tmp_path):
    wheels, target, work, src = tmp_path / "wheels", tmp_path / "site", tmp_path / "work", tmp_path / "src"
    work.mkdir()
    # Build from a copy: setuptools builds in the source tree, and the repository should not get a build/.
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "build", "data", ".whl",
                                                              "*.egg-info", "__pycache__", ".*_cache"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheels), str(src)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("sift_train-*.whl")
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                              str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    assert (target / "configs" / "demo-cpu.yaml").is_file() and (target / "ds_configs" / "zero1.json").is_file()

    env = single_env({"PYTHONPATH": str(target)})  # the installed copy, not the repository
    where = subprocess.run([sys.executable, "-c", "import engine, launcher; print(engine.__file__, launcher.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, timeout=60)
    assert where.stdout.split() and all(p.startswith(str(target)) for p in where.stdout.split()), where.stdout

    steps = ["train.steps=4", "train.log_every=2", "train.eval_every=4", "train.save_every=4",
             "train.eval_samples=32", "sift.warmup_steps=2", "sift.fidelity_every=0"]
    demo = subprocess.run([sys.executable, "-m", "launcher.cli", "demo", *steps], cwd=work, env=env,
                          capture_output=True, text=True, timeout=900)
    assert demo.returncode == 0, f"{demo.stdout[-3000:]}\n{demo.stderr[-5000:]}"
    summary = json.loads((work / "runs" / "demo" / "train" / "summary.json").read_text())
    assert summary["steps"] == 4
    assert not any(p.name == "runs" for p in target.rglob("runs")), "outputs landed inside the installed package"
