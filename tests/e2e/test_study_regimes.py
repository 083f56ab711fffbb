"""`sift study` with the continuation protocol on data regimes built from a generated corpus: the regimes
share one validation set and a held-out group, one warm-up run is branched by every arm and seed, the
probe measures kept kinds, the engine evaluates the held-out set, the report pairs by seed; a continuation killed after
a checkpoint resumes bitwise."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from engine.config import load_config
from engine.optim import lr_factor, warmup_steps
from study.jobs import dropout_seed
from tests.distributed.common import REPO, single_env
from tests.runs import TINY_RUN, evals

W, C = 10, 10


def study(out: Path, spec: Path, data: Path, *extra: str, env_extra: dict[str, str] | None = None,
          timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "launcher.cli", "study", "--config", str(spec), "--regimes", "noisy", "--seeds", "0,1",
           "--arms", "vanilla,loss:1", "--data", str(data), "--out", str(out), "--keep-checkpoints", *extra]
    env = single_env(env_extra)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def events(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "study-log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(study file, regimes root, finished study directory)."""
    from data_pipeline.demo_corpus import write_demo_corpus

    root = tmp_path_factory.mktemp("regimes-study")
    corpus = write_demo_corpus(root / "corpus", seed=0, target_docs=400, stdlib=False)
    tree = yaml.safe_load(TINY_RUN.read_text())
    tree["train"].update(save_every=5, keep_last=2, eval_every=5)
    tree["sift"]["warmup_steps"] = 0
    tree["study"] = {"name": "tiny-regimes", "warm": {"steps": W, "seed": 0}, "continue_steps": C, "parallel": 2,
                     "regimes": {"input": str(corpus), "group_field": "source", "heldout_group": "grammar/hard",
                                 "names": ["clean", "noisy"], "copies": 2, "val_fraction": 0.1,
                                 "prepare_args": ["--seq-len", "64", "--vocab-size", "600", "--num-proc", "1",
                                                  "--seed", "0"]}}
    spec = root / "study.yaml"
    spec.write_text(yaml.safe_dump(tree))
    data, out = root / "data", root / "study"
    result = study(out, spec, data)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return spec, data, out


def test_regimes_share_the_validation_set_and_hold_a_source_out(setup):
    _, data, _ = setup
    index = {n: json.loads((data / n / "index.json").read_text()) for n in ("clean", "noisy", "heldout")}
    assert index["noisy"]["splits"]["validation"] == index["clean"]["splits"]["validation"]
    assert index["noisy"]["splits"]["train"]["rows"] > index["clean"]["splits"]["train"]["rows"]
    manifest = json.loads((data / "regimes.json").read_text())
    assert manifest["heldout"]["group"] == "grammar/hard" and index["heldout"]["splits"]["validation"]["rows"] > 0
    assert set(manifest["regimes"]["noisy"]["kind_data"]) == {"original", "noise-shuffled", "noise-random"}
    assert 0.24 < sum(v for k, v in manifest["regimes"]["noisy"]["char_share"].items() if k != "original") < 0.3


def test_one_warm_up_run_is_branched_by_every_arm_and_seed(setup):
    _, _, out = setup
    ev = events(out)
    assert [e["run"] for e in ev if e["action"] == "start"] == ["noisy/warm"]  # the rest resume its checkpoint
    branched = sorted(e["run"] for e in ev if e["action"] == "branch")
    assert branched == sorted(["noisy/start/seed0", "noisy/start/seed1", "noisy/vanilla/seed0", "noisy/vanilla/seed1",
                               "noisy/loss-1/seed0", "noisy/loss-1/seed1"])
    assert all(e["step"] == W for e in ev if e["action"] == "resume")
    rng = {}
    for seed in (0, 1):
        run = out / "noisy" / "runs" / "loss-1" / f"seed{seed}"
        records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        # one LR schedule over W + C steps, continued where the warm-up run stopped
        lrs = {r["step"]: r["lr"] for r in records if "lr" in r}
        assert min(lrs) == W + 1 and all(v == pytest.approx(1e-3 * lr_factor(s, total_steps=W + C, warmup=2,
                                                                            decay="linear")) for s, v in lrs.items())
        assert all(r["selecting"] for r in records if "selecting" in r)  # selection from the first step
        # the seed draws its own dropout masks: the branched checkpoint's RNG state was re-seeded
        branch = json.loads((run / "branch.json").read_text())
        assert branch["step"] == W and branch["dropout_seed"] == dropout_seed(seed)
        rng[seed] = torch.load(run / "checkpoints" / "step00000015" / "sift_rank00000.pt", weights_only=False)["torch_rng"]
    assert not torch.equal(rng[0], rng[1])  # from one shared state they would be equal: same shapes, same draws
    warm = json.loads((out / "noisy" / "warm" / "summary.json").read_text())
    assert warm["steps"] == W


def test_the_report_pairs_by_seed_from_the_shared_start(setup):
    _, _, out = setup
    report = out / "report"
    res = json.loads((report / "noisy" / "results.json").read_text())
    assert res["metrics"] == ["val_mlm_acc", "heldout_val_mlm_acc"] and res["incomplete_runs"] == []
    curves = report / "noisy" / "curves"
    for seed in (0, 1):
        start = [json.loads(x) for x in (curves / "start" / f"seed{seed}.jsonl").read_text().splitlines()]
        assert [r["step"] for r in start] == [W] and 0 <= start[0]["heldout_val_mlm_acc"] <= 1
    end = {(r["metric"], r["axis"]): r for r in res["comparisons"] if r["arm"] == "loss-1" and r["ref"] == "vanilla"}
    assert set(end) == {(m, a) for m in res["metrics"] for a in ("backprop_samples", "cpu_s", "hours")}
    final = {(a, s): evals(out / "noisy" / "runs" / a / f"seed{s}")[-1] for a in ("vanilla", "loss-1") for s in (0, 1)}
    for seed in (0, 1):
        want = final[("loss-1", seed)]["val_mlm_acc"] - final[("vanilla", seed)]["val_mlm_acc"]
        assert end[("val_mlm_acc", "backprop_samples")]["per_seed"][str(seed)] == pytest.approx(want)
    assert end[("val_mlm_acc", "backprop_samples")]["n"] == 2 and "lo" in end[("val_mlm_acc", "backprop_samples")]
    kept = {r["kind"]: r for r in res["kept"]}
    assert set(kept) == {"original", "noise-shuffled", "noise-random"}
    assert sum(r["end_exit"]["mean"] for r in kept.values()) == pytest.approx(1.0)
    assert res["warm"]["steps"] == W and res["warm"]["cpu_s"] > 0
    assert "## noisy" in (report / "verdict.md").read_text()
    for name in ("accuracy_vs_samples.png", "heldout_vs_samples.png", "accuracy_vs_cpu.png"):
        assert (report / "noisy" / name).read_bytes()[:4] == b"\x89PNG", name
    cpu = [json.loads(x)["cpu_s"] for x in (curves / "loss-1" / "seed0.cputime.jsonl").read_text().splitlines()]
    assert cpu == sorted(cpu) and cpu[0] > 0


def test_a_continuation_killed_after_a_checkpoint_resumes_bitwise(setup, tmp_path):
    spec, data, done = setup
    out = tmp_path / "copy"
    shutil.copytree(done, out)
    run = out / "noisy" / "runs" / "loss-1" / "seed1"  # killed after its step-15 checkpoint
    for name in ("summary.json", "probe.json"):
        (run / name).unlink()
    shutil.rmtree(run / "checkpoints" / "step00000020")
    before = len(events(out))
    result = study(out, spec, data)
    assert result.returncode == 0, result.stderr[-5000:]
    new = [(e["run"], e["action"], e.get("step")) for e in events(out)[before:] if e["action"] != "skip"]
    assert new == [("noisy/loss-1/seed1", "resume", 15), ("noisy/loss-1/seed1", "done", None)]
    assert json.loads((run / "probe.json").read_text())["step"] == W + C  # probed in the same process
    want = evals(done / "noisy" / "runs" / "loss-1" / "seed1")[-1]
    assert evals(run)[-1]["val_mlm_loss"] == want["val_mlm_loss"]


@pytest.mark.slow
def test_equal_compute_with_a_reducible_arm_and_its_automatic_reference(setup, tmp_path):
    """study.budget: flops: the regime's reference is trained once (`sift reference --half 1`) before the
    reducible arm, which trains on half 0 with it online; each arm stops at vanilla's counted FLOPs with its
    schedule ending there; the report leads with equal FLOPs and states the reference's cost."""
    spec, data, _ = setup
    tree = yaml.safe_load(spec.read_text())
    tree["study"].update(budget="flops", name="tiny-flops")
    flops_spec = tmp_path / "flops.yaml"
    flops_spec.write_text(yaml.safe_dump(tree))
    out = tmp_path / "flops"
    result = subprocess.run([sys.executable, "-m", "launcher.cli", "study", "--config", str(flops_spec), "--regimes",
                             "noisy", "--seeds", "0,", "--arms", "vanilla,reducible:1", "--data", str(data), "--out",
                             str(out)], cwd=REPO, env=single_env(None), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    ev = [(e["run"], e["action"]) for e in events(out)]
    assert ev.index(("noisy/reference", "done")) < ev.index(("noisy/reducible-1/seed0", "branch"))
    ref = json.loads((out / "noisy" / "reference" / "reference.json").read_text())["references"]
    assert [(r["half"], r["steps"]) for r in ref] == [(1, W)] and ref[0]["flops"] > 0
    run = out / "noisy" / "runs" / "reducible-1" / "seed0"
    config = yaml.safe_load((run / "config.yaml").read_text())
    steps = config["train"]["steps"]
    assert W < steps < W + C and config["optim"]["schedule_steps"] == steps and config["data"]["train_half"] == 0
    assert evals(run)[-1]["step"] == steps
    # one LR schedule whose horizon is the arm's own last step (vanilla's is W + C)
    lrs = {r["step"]: r["lr"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "lr" in r}
    warm = warmup_steps(load_config(run / "config.yaml").optim, steps)
    assert max(lrs) == steps and all(v == pytest.approx(1e-3 * lr_factor(s, total_steps=steps, warmup=warm,
                                                                        decay="linear")) for s, v in lrs.items())
    res = json.loads((out / "report" / "noisy" / "results.json").read_text())
    assert res["budget"]["arms"]["vanilla"]["steps"] == C and res["budget"]["arms"]["reducible-1"]["steps"] == steps - W
    heads = [r for r in res["comparisons"] if r["arm"] == "reducible-1" and r["metric"] == "val_mlm_acc"]
    assert [r["axis"] for r in heads] == ["flops", "backprop_samples", "cpu_s", "hours"]  # one seed: no Holm yet
    report = (out / "report" / "noisy" / "report.md").read_text()
    assert "## Reference model (reducible arms)" in report and "equal counted FLOPs" in report


def test_report_only_probes_a_finished_run_that_lacks_its_probe(setup, tmp_path):
    """A run that finished before the probe knew its selection (a study under way when the probe learned the
    weighted and reducible arms): `--report-only` probes it in its own process from the kept checkpoint,
    as the run's job would have, and the report reads it."""
    from study.cli import main

    spec, data, done = setup
    out = tmp_path / "copy"
    shutil.copytree(done, out)
    run = out / "noisy" / "runs" / "loss-1" / "seed1"
    made = json.loads((run / "probe.json").read_text())
    (run / "probe.json").unlink()
    assert main(["--config", str(spec), "--regimes", "noisy", "--seeds", "0,1", "--arms", "vanilla,loss:1",
                 "--data", str(data), "--out", str(out), "--report-only"]) == 0
    again = json.loads((run / "probe.json").read_text())
    assert again["step"] == made["step"] and set(again["kept"]) == {"loss:1"}
    for which in ("exit", "exact", "exit_weight", "exact_weight"):
        assert again["kept"]["loss:1"][which] == pytest.approx(made["kept"]["loss:1"][which], abs=1e-3), which
    assert again["kept"]["loss:1"]["exit_weight"] == again["kept"]["loss:1"]["exit"]  # top-k: every weight 1
    res = json.loads((out / "report" / "noisy" / "results.json").read_text())
    assert {r["kind"] for r in res["kept"] if r["end_exit"].get("n") == 2} == {"original", "noise-shuffled",
                                                                               "noise-random"}
