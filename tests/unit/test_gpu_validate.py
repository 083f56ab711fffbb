"""benchmarks/gpu/gpu_validate.sh, checked on CPU before any device time is spent: its syntax, its time budget,
and that every command it runs accepts its flags and run-config overrides.

The script's dry run prints each stage's command exactly as it would run it (`printf %q`, variables
expanded); each is then parsed by the same code the command would use, without running it.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest

from benchmarks import throughput
from benchmarks.gpu import gpu_report
from benchmarks.probes import sync_audit
from data_pipeline.prepare import build_parser as prepare_parser
from engine.config import load_config
from engine.ds_config import RunFacts, fill, load_json
from tests.distributed.common import REPO, base_env

SCRIPT = REPO / "benchmarks" / "gpu" / "gpu_validate.sh"
DEVICE_CALL_S = 8 * 60


def budget(name: str) -> int:
    return int(re.search(rf"^{name}=(\d+)", SCRIPT.read_text(), re.M).group(1))


def dry_run(out, part: int) -> list[tuple[str, int, list[str]]]:
    env = {**os.environ, "GPU_VALIDATE_DRY_RUN": "1", "OUT": str(out), "PY": "python3", "GPU_VALIDATE_PART": str(part)}
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    rows = []
    for line in proc.stdout.splitlines():
        head, _, cmd = line.partition(" :: ")
        tag, name, limit = head.split()
        assert tag == "STAGE"
        rows.append((name, int(limit), shlex.split(cmd)))
    return rows


@pytest.fixture(scope="module")
def stages(tmp_path_factory) -> list[tuple[str, int, list[str]]]:
    return dry_run(tmp_path_factory.mktemp("gpu-out"), part=1)


@pytest.fixture(scope="module")
def follow_up(tmp_path_factory) -> list[tuple[str, int, list[str]]]:
    return dry_run(tmp_path_factory.mktemp("gpu-out-2"), part=2)


def test_syntax():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_stages_fit_one_device_call(stages):
    names = [n for n, _, _ in stages]
    for required in ("env", "pytest-gpu", "sync-audit", "bench-T512", "bench-T128", "train-z2-killed",
                     "train-z2-resumed", "train-z3", "profile-T512", "summary"):
        assert required in names
    assert names[-1] == "summary"
    work = sum(limit for name, limit, _ in stages if name != "summary")
    assert budget("BUDGET_S") + 10 <= DEVICE_CALL_S  # stages stop starting at BUDGET_S - SUMMARY_S (+5 s kill)
    assert work + budget("INSTALL_S") + budget("SUMMARY_S") <= DEVICE_CALL_S


def module_args(argv: list[str]) -> tuple[str, list[str]]:
    assert argv[:2] == ["python3", "-m"], argv
    return argv[2], argv[3:]


def check_bench(args: list[str]) -> None:
    ns = throughput.parse_args(args)
    _, preset = throughput.resolve_preset(ns, cuda=True)
    variants = throughput.grid(preset, tuple(ns.variants), (False,), throughput.model_layers(preset, ns.overrides))
    assert variants
    for v in variants:
        cfg = load_config(None, v.overrides(preset, list(ns.overrides)))
        check_ds_json(cfg.deepspeed.config)


def check_ds_json(path: str) -> None:
    template = load_json(path)  # a path, or the name of a shipped JSON (engine/resources.py)
    fill(template, RunFacts(micro_batch_size=32, grad_accum=1, world_size=1, grad_clip=1.0, precision="bf16",
                            num_params=110_000_000))


def check_train(args: list[str]) -> None:
    assert args[0] == "train" and args[1] == "--config", args
    config, overrides = args[2], args[3:]
    assert all("=" in o and not o.startswith("-") for o in overrides), overrides
    cfg = load_config(REPO / config, overrides)
    check_ds_json(cfg.deepspeed.config)


def test_the_follow_up_fits_what_a_session_has_left(follow_up):
    """Part 2 runs on the warm machine after part 1: together under 15 device-minutes with a 2-minute start."""
    names = [n for n, _, _ in follow_up]
    assert {"bench-T512-compile", "bench-T512-nonfinite-skip", "bench-T512-nonfinite-stop"} <= set(names)
    assert names[-1] == "summary"
    work = sum(limit for _, limit, _ in follow_up) + budget("INSTALL_S")
    assert 120 + DEVICE_CALL_S + work <= 15 * 60


@pytest.mark.parametrize("part", ["stages", "follow_up"])
def test_every_command_accepts_its_flags(part, request):
    stages = request.getfixturevalue(part)
    checked = set()
    for name, _, argv in stages:
        module, args = module_args(argv)
        if module == "benchmarks.throughput":
            check_bench(args)
        elif module == "benchmarks.probes.sync_audit":
            ns = sync_audit.parse_args(args)
            preset, variants = sync_audit.variants_of(ns, cuda=True)
            for v in variants:
                load_config(None, v.overrides(preset, list(ns.overrides)))
        elif module == "benchmarks.gpu.gpu_report":
            gpu_report.parse_args(args)
        elif module == "launcher.cli" and args[0] == "prepare":
            ns = prepare_parser().parse_args(args[1:])
            assert (REPO / ns.tokenizer).is_dir()
        elif module == "launcher.cli" and args[0] == "train":
            check_train(args)
        elif module == "pytest":
            continue  # collected below, in one subprocess
        else:
            pytest.fail(f"stage {name}: no check for `{shlex.join(argv)}`; add one to this test")
        checked.add(name)
    assert checked == {name for name, _, argv in stages if argv[2] != "pytest"}


def test_the_training_command_line_is_accepted_by_sift_train(stages):
    """One real parse by the CLI itself (`--print-config` resolves the config and exits)."""
    _, _, argv = next(s for s in stages if s[0] == "train-z3")
    proc = subprocess.run([sys.executable, *argv[1:], "--print-config"], cwd=REPO, env=base_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert '"zero3.json"' in proc.stdout or "zero3.json" in proc.stdout


def test_the_gpu_tests_are_collected(stages, tmp_path):
    _, _, argv = next(s for s in stages if s[0] == "pytest-gpu")
    _, args = module_args(argv)
    args = [a for a in args if not a.startswith("--junitxml")] + ["--collect-only"]
    proc = subprocess.run([sys.executable, "-m", "pytest", *args], cwd=REPO, env=base_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert re.search(r"(\d+) tests? collected", proc.stdout) and "test_streams_gpu.py" in proc.stdout
