"""Which variables reach the ranks, and `.deepspeed_env` as the deepspeed runner reads it."""

from __future__ import annotations

import pytest

from launcher.envvars import (
    OBSOLETE_SETTINGS,
    P4D_ENV,
    collect_env,
    forwarded_by_deepspeed,
    mangled_by_deepspeed,
    obsolete_settings,
    render_deepspeed_env,
    write_deepspeed_env,
)
from launcher.errors import LaunchError


def test_precedence_profile_then_shell_then_forward_then_env_flag():
    environ = {"NCCL_SOCKET_IFNAME": "ens32", "FI_LOG_LEVEL": "warn", "HOME": "/h", "HF_HOME": "/cache"}
    got = collect_env(environ, profile=P4D_ENV, overrides={"FI_LOG_LEVEL": "info"}, forward=["HF_HOME"])
    assert got == {"FI_EFA_USE_HUGE_PAGE": "0", "NCCL_SOCKET_IFNAME": "ens32", "FI_LOG_LEVEL": "info",
                   "HF_HOME": "/cache"}
    with pytest.raises(LaunchError, match="--forward WANDB_API_KEY: WANDB_API_KEY is not set"):
        collect_env(environ, forward=["WANDB_API_KEY"])


def test_p4d_profile_is_current_aws_guidance():
    assert P4D_ENV["FI_EFA_USE_HUGE_PAGE"] == "0"
    assert P4D_ENV["NCCL_SOCKET_IFNAME"].startswith("^") and {"lo", "docker"} <= set(
        P4D_ENV["NCCL_SOCKET_IFNAME"][1:].split(","))
    assert not set(P4D_ENV) & set(OBSOLETE_SETTINGS)


def test_obsolete_settings_are_pointed_out():
    notes = obsolete_settings({"FI_PROVIDER": "efa", "NCCL_PROTO": "simple", "FI_EFA_USE_HUGE_PAGE": "0"})
    assert len(notes) == 2 and notes[0].startswith("FI_PROVIDER=efa is obsolete")


def test_deepspeed_forwards_these_prefixes_itself():
    assert forwarded_by_deepspeed("PYTHONPATH") and forwarded_by_deepspeed("UCX_TLS")
    assert not forwarded_by_deepspeed("FI_EFA_USE_HUGE_PAGE") and not forwarded_by_deepspeed("NCCL_DEBUG")


def test_render_is_key_value_lines_only():
    text = render_deepspeed_env({"FI_EFA_USE_HUGE_PAGE": "0", "NCCL_SOCKET_IFNAME": "^lo,docker", "EMPTY": ""})
    assert text == "FI_EFA_USE_HUGE_PAGE=0\nNCCL_SOCKET_IFNAME=^lo,docker\nEMPTY=\n"
    # exactly how the runner reads it: one split on '=' per line, no comments, no blank lines
    assert dict(line.split("=", 1) for line in text.splitlines()) == {
        "FI_EFA_USE_HUGE_PAGE": "0", "NCCL_SOCKET_IFNAME": "^lo,docker", "EMPTY": ""}


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [("1BAD", "x", "not a valid environment variable name"), ("A-B", "x", "not a valid"),
     ("X", 'say "hi"', "quote"), ("X", "$HOME/x", "'$'"), ("X", "a\nb", "newline"), ("X", " padded", "spaces")],
)
def test_render_rejects_what_the_runner_or_remote_shell_would_break(key, value, fragment):
    with pytest.raises(LaunchError, match=r"cannot write \.deepspeed_env") as err:
        render_deepspeed_env({key: value})
    assert fragment in str(err.value)


def test_values_mangled_by_the_openmpi_and_slurm_runners():
    values = {"NCCL_SOCKET_IFNAME": "^lo,docker", "FI_EFA_USE_HUGE_PAGE": "0", "NCCL_IB_HCA": "efa_0,efa_1"}
    assert mangled_by_deepspeed(values, "pdsh") == []
    assert mangled_by_deepspeed(values, "openmpi") == ["NCCL_SOCKET_IFNAME=^lo,docker"]
    assert mangled_by_deepspeed(values, "slurm") == ["NCCL_SOCKET_IFNAME=^lo,docker", "NCCL_IB_HCA=efa_0,efa_1"]


def test_write_keeps_a_backup_of_different_content(tmp_path):
    path, backup = write_deepspeed_env("A=1\n", tmp_path)
    assert (path.read_text(), backup) == ("A=1\n", None)
    assert write_deepspeed_env("A=1\n", tmp_path) == (path, None)  # same content: nothing to back up
    path, backup = write_deepspeed_env("B=2\n", tmp_path, ".my_env")
    assert backup is None and path.name == ".my_env"
    path, backup = write_deepspeed_env("A=2\n", tmp_path)
    assert path.read_text() == "A=2\n" and backup is not None and backup.read_text() == "A=1\n"
