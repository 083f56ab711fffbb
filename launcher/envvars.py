"""Which environment variables must reach every rank, and the `.deepspeed_env` file that carries them.

Facts from DeepSpeed 0.19.8 (`deepspeed/launcher/runner.py`, `multinode_runner.py`):
- For multi-node launches the runner forwards only variables whose names start with MLFLOW, PYTHON,
  MV2 or UCX, plus the accelerator's `export_envs()`: ['NCCL'] when the machine running `deepspeed`
  has CUDA, nothing when it is a CPU-only head node. Everything else, EFA's FI_* included, must be
  listed in `.deepspeed_env` (KEY=VALUE lines, read from ~ and from the current directory).
- That file is split on the first '=' per line: a comment or blank line crashes the runner, so the
  file holds nothing but KEY=VALUE lines.
- Values with characters outside `[A-Za-z0-9_@%+=:,./-]` are wrapped in double quotes. pdsh runs them
  through a shell (fine), but the openmpi and slurm runners pass the quotes on literally, and srun's
  `--export` also splits values on commas: `NCCL_SOCKET_IFNAME=^lo,docker` reaches the ranks broken.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from launcher.errors import LaunchError

DEEPSPEED_FORWARDED_PREFIXES = ("MLFLOW", "PYTHON", "MV2", "UCX")
DEEPSPEED_CUDA_FORWARDED_PREFIXES = ("NCCL",)
# sift forwards these from the launching shell, so a setting made there reaches every rank whatever
# the launcher (NCCL_* too: DeepSpeed drops them when `deepspeed` runs on a CPU-only head node).
FORWARD_PREFIXES = ("FI_", "NCCL_")
DEEPSPEED_ENV_NAME = ".deepspeed_env"

# What AWS recommends today for p4d with EFA installer >= 1.29 (libfabric >= 1.18, aws-ofi-nccl >= 1.7),
# per aws-ofi-nccl's doc/efa-env-var.md. The Dockerfile and the SLURM scripts set the same values.
P4D_ENV: dict[str, str] = {
    # DataLoader workers fork; with huge pages libfabric's registered memory can make fork() fail
    # with "Cannot allocate memory". Costs a little EFA performance.
    "FI_EFA_USE_HUGE_PAGE": "0",
    # NCCL's bootstrap and socket fallback must not pick loopback or a docker bridge.
    "NCCL_SOCKET_IFNAME": "^lo,docker",
}
PROFILES: dict[str, dict[str, str]] = {"none": {}, "p4d": P4D_ENV}

# Settings from old guides that current libfabric/aws-ofi-nccl no longer need (same source).
OBSOLETE_SETTINGS: dict[str, str] = {
    "FI_EFA_USE_DEVICE_RDMA": "needed only with aws-ofi-nccl < 1.7 or libfabric < 1.18; RDMA is on by default on p4d",
    "FI_PROVIDER": "needed only with aws-ofi-nccl <= 1.5; the plugin selects the efa provider itself",
    "NCCL_PROTO": "'simple' was needed only with aws-ofi-nccl <= 1.5; forcing it slows NCCL down",
    "FI_EFA_FORK_SAFE": "the plugin sets it itself when the kernel needs it",
}

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DS_UNQUOTED = re.compile(r"^[\w@%+=:,./-]*$")  # DeepSpeed's add_export quotes anything else
_SHELL_UNSAFE = ('"', "$", "`", "\\", "\n", "\r")


def collect_env(
    environ: Mapping[str, str],
    *,
    profile: Mapping[str, str] | None = None,
    overrides: Mapping[str, str] | None = None,
    forward: Iterable[str] = (),
) -> dict[str, str]:
    """The variables every rank should get, lowest precedence first.

    Profile defaults, then FI_*/NCCL_* already set in the launching environment (a value the user
    exported wins over a profile default), then `--forward NAME` (current value), then `--env K=V`.
    """
    out: dict[str, str] = dict(profile or {})
    out.update({k: v for k, v in environ.items() if k.startswith(FORWARD_PREFIXES)})
    for name in forward:
        if name not in environ:
            raise LaunchError(f"--forward {name}: {name} is not set in this environment")
        out[name] = environ[name]
    out.update(overrides or {})
    return out


def obsolete_settings(values: Mapping[str, str]) -> list[str]:
    """One line per obsolete EFA/NCCL setting present, saying why it can go."""
    return [f"{k}={values[k]} is obsolete: {why}" for k, why in OBSOLETE_SETTINGS.items() if k in values]


def forwarded_by_deepspeed(name: str) -> bool:
    """True if the deepspeed runner forwards `name` by itself on any head node (CUDA or not)."""
    return name.startswith(DEEPSPEED_FORWARDED_PREFIXES)


def mangled_by_deepspeed(values: Mapping[str, str], ds_launcher: str) -> list[str]:
    """Values the deepspeed openmpi/slurm runners would deliver altered (see the module docstring)."""
    if ds_launcher == "pdsh":
        return []
    bad = []
    for k, v in values.items():
        if not _DS_UNQUOTED.match(v.strip()) or (ds_launcher == "slurm" and "," in v):
            bad.append(f"{k}={v}")
    return bad


def render_deepspeed_env(values: Mapping[str, str]) -> str:
    """`.deepspeed_env` text: KEY=VALUE lines only; raise LaunchError for what would break the runner."""
    problems = []
    for k, v in values.items():
        if not _KEY.match(k):
            problems.append(f"{k!r} is not a valid environment variable name")
        elif any(c in v for c in _SHELL_UNSAFE):
            problems.append(f"{k}: the value {v!r} has a quote, '$', backquote, backslash or newline, which the "
                            f"remote shell would interpret; set it on the nodes themselves instead")
        elif v != v.strip():
            problems.append(f"{k}: the value {v!r} has leading/trailing spaces, which the deepspeed runner strips")
    if problems:
        raise LaunchError("cannot write .deepspeed_env:\n  " + "\n  ".join(problems))
    return "".join(f"{k}={v}\n" for k, v in values.items())


def write_deepspeed_env(text: str, directory: str | Path = ".", name: str = DEEPSPEED_ENV_NAME) -> tuple[Path, Path | None]:
    """Write the file; an existing one with other content is kept as `<name>.bak`. Returns (path, backup)."""
    path = Path(directory) / name
    backup = None
    if path.exists():
        old = path.read_text()
        if old == text:
            return path, None
        backup = path.with_name(name + ".bak")
        backup.write_text(old)
    path.write_text(text)
    return path, backup
