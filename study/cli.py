"""`sift study`: a reproducible time-to-accuracy study of SIFT against vanilla and random selection.

    sift study --preset cpu                                  # the CPU grid (prepares its data if needed)
    sift study --preset cpu --data DIR --out runs/study-cpu  # on any shards made by `sift prepare`
    sift study --config configs/study-gpu.yaml --parallel 1 --seeds 0,1,2
    sift study --preset cpu --arms vanilla,random,entropy:1 train.steps=300   # a smaller grid
    sift study --preset cpu --report-only                    # redo the tables and plots from the runs
    sift study --preset gpt2-cpu --seeds 5 --report-only --report benchmarks/results/study-gpt2-cpu
                                   # no runs there: report.md again from the committed results.json

One base run config, several arms (vanilla: B rows per step; random: keep a random B of G = B / keep, the
control; loss- and entropy-SIFT at exits 1, 2, L/2 and L), several seeds; every run shares the shards,
the validation split, the evaluation schedule and the step count, so every arm back-propagates the same
number of samples. Each run is one `launcher/train.py` process writing to <out>/runs/<arm>/seed<k>/.

Resumable: a finished run (summary.json at the last step) is skipped, an interrupted one continues from
its latest checkpoint, a missing one starts; a run whose config or data changed since it was made is
refused rather than mixed in. The report (<out>/report/ or --report DIR) holds results.json (every
table's numbers: the compact form a committed study keeps), report.md, the PNG figures and the runs'
curves (curves/, left out of git).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from engine.config import ConfigError, load_config, to_dict
from engine.resources import resolve
from sift_common.errors import SiftError
from sift_common.logs import setup_logging
from sift_common.provenance import git_commit, load_average, machine, versions
from study.jobs import EventLog, RunPlan, child_env, execute, run_state
from study.spec import VANILLA, Arm, StudyError, StudySpec, build_spec, parse_selection, selection_of

PRESETS = {name: resolve(f"study-{name}", "configs") for name in ("cpu", "gpu", "regimes-cpu", "gpt2-cpu", "gpt2-continue-cpu")}
"""Preset name -> the shipped study file (configs/, package data: engine/resources.py)."""
MARKER = "study-run.json"  # in each run directory: the config and data it was made with
log = logging.getLogger("sift.study")


# ----------------------------------------------------------------------------- planning


def data_fingerprint(data: Path) -> dict[str, Any]:
    """What identifies the shards: the hash of index.json (which holds every shard's SHA-256)."""
    raw = (data / "index.json").read_bytes()
    index = json.loads(raw)
    return {"index_sha256": hashlib.sha256(raw).hexdigest(), "seq_len": index.get("seq_len"),
            "vocab_size": index.get("vocab_size"), "objective": index.get("objective"),
            "rows": {k: v.get("rows") for k, v in index.get("splits", {}).items()}}


@dataclass(slots=True)
class Regime:
    """One dataset the grid runs on, with its own runs and report: a regime of `study.regimes`
    (clean, redundant, noisy), or the study's data alone (name "")."""

    name: str
    data: Path
    out: Path  # runs/, warm/, start/ go here
    heldout: dict[str, Path] = field(default_factory=dict)  # extra evaluation sets (data.extra_eval), by name
    kinds: dict[str, tuple[Path, float]] = field(default_factory=dict)  # kind -> (dataset, share of training)


def _resolve(base: Path, overrides: list[str], where: str, problems: list[str]) -> Any:
    try:
        return load_config(base, overrides)
    except ConfigError as e:
        problems.append(f"{where}: " + "; ".join(e.problems))
        return None


def _facts(data: Path) -> Any:
    """The dataset's DataFacts (vocabulary, sequence length, objective), or None before it is built."""
    if not (data / "index.json").is_file():
        return None
    from data_pipeline.index import read_index
    from engine.reference import data_facts

    return data_facts(read_index(data)[0])


class _Flops:
    """Counted FLOPs per step of a regime's run configs (study/budget.py), models built once per config."""

    def __init__(self, facts: Any):
        self.facts, self._rows = facts, {}

    def per_row(self, model_cfg: Any) -> Any:
        """The model's FlopCounts per row (its layers: ``.layers``)."""
        from engine.models import build_model

        key = json.dumps(dataclasses.asdict(model_cfg), sort_keys=True, default=str)
        if key not in self._rows:
            self._rows[key] = build_model(model_cfg, self.facts).flops(self.facts.seq_len)
        return self._rows[key]

    def step(self, cfg: Any, reference: Any = None) -> Any:
        from study.budget import step_flops

        ref_row = 0.0
        if reference is not None:  # the reference's forward: every block and the head (engine/reference.py)
            counts = self.per_row(reference.model)
            ref_row = counts.scoring(counts.layers)
        return step_flops(cfg, self.per_row(cfg.model), self.facts.seq_len, ref_row, self.facts.objective)


def reference_job(ref_dir: Path, bert: bool) -> tuple[list[str], list[str]]:
    """(the `sift reference` command, the overrides a reducible arm gets). BERT: one reference on half 1
    of the training split, run online, and the arm trains on half 0 (its masks change every epoch, so no
    sidecar); decoders: RHO-LOSS's two references (halves 0 and 1) and a sidecar scoring each row with the
    one that did not see it."""
    cmd = [sys.executable, "-m", "launcher.reference", "--config", str(ref_dir / "config.yaml"), "--out", str(ref_dir)]
    if bert:
        return [*cmd, "--half", "1"], [f"sift.reference={ref_dir}", "data.train_half=0"]
    sidecar = ref_dir / "losses.sidecar"
    return ([*cmd, "--half", "both", "--sidecar", str(sidecar)],
            [f"sift.reference={ref_dir / 'half0'}", f"sift.reference_losses={sidecar}"])


def plan_runs(spec: StudySpec, regime: Regime) -> list[RunPlan]:
    """Every job of one regime, each config validated: with the continuation protocol the warm-up run,
    then per seed its start evaluation and every arm's run (seed-major: an interrupted study has whole
    seeds); without it, every (arm, seed) run from random init. Reducible arms without a reference of their
    own depend on the regime's reference job (`sift reference`). With ``study.budget: flops`` each arm's
    steps (and LR schedule) end where its counted FLOPs reach vanilla's."""
    from study.budget import budget_steps
    from study.spec import needs_reference

    held = [f"data.extra_eval.{n}={d}" for n, d in regime.heldout.items()]  # evaluated at every evaluation
    common = [*spec.overrides, f"data.path={regime.data}", *held]
    kinds = [a for k, (d, w) in regime.kinds.items() for a in ("--kind", f"{k}={d}:{w}")]
    br = spec.branch
    first = br.warm_steps if br else 0

    def protocol(steps: int | None) -> list[str]:  # steps: the arm's own (continuation) steps
        if steps is None:
            return [] if br is None else [f"train.steps={br.total}", f"optim.schedule_steps={br.total}"]
        return [f"train.steps={first + steps}", f"optim.schedule_steps={first + steps}"]

    plans: list[RunPlan] = []
    problems: list[str] = []
    flops = _Flops(_facts(regime.data)) if spec.budget == "flops" else None
    if flops is not None and flops.facts is None:
        log.warning("%s: no prepared data yet, so the FLOPs budget cannot be counted; the plan shows equal steps",
                    regime.data)
        flops = None
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base.yaml"
        base.write_text(yaml.safe_dump(spec.base, sort_keys=False))

        def resolve_(arm: Arm, extra: list[str], where: str) -> Any:
            return _resolve(base, [*common, *arm.overrides, *extra], where, problems)

        def add(arm: Arm, seed: int, run_dir: Path, extra: list[str], kind: str = "run", steps: int | None = None,
                cost: Any = None) -> RunPlan | None:
            cfg = resolve_(arm, [*protocol(steps), *extra, f"train.seed={seed}", f"train.out_dir={run_dir}"],
                           f"{kind} {arm.name}")
            if cfg is None:
                return None
            plan = RunPlan(arm, seed, run_dir, to_dict(cfg), kind=kind, regime=regime.name, flops=cost)
            if warm is not None:
                plan.deps, plan.branch = [warm.key], warm.dir
            plans.append(plan)
            return plan

        warm = None
        if br is not None:
            warm = add(VANILLA, br.warm_seed, regime.out / "warm", [f"train.steps={br.warm_steps}"], "warm")
        ref_plan, ref_extra, ref_cfg = None, [], None
        if spec.reference_model is not None:
            rm, ref_dir = spec.reference_model, regime.out / "reference"
            ref_cfg = resolve_(Arm("reference", ("method=none",)),
                               [*rm.overrides, f"train.steps={rm.steps}", "train.seed=0", f"train.out_dir={ref_dir}"],
                               "reference")
            if ref_cfg is not None:
                bert = ref_cfg.model.family == "bert"
                cmd, ref_extra = reference_job(ref_dir, bert)
                ref_plan = RunPlan(Arm("reference", ()), 0, ref_dir, to_dict(ref_cfg), kind="reference",
                                   regime=regime.name, command=cmd)
                plans.append(ref_plan)
        # each arm's steps: equal samples, or within vanilla's counted FLOPs
        steps: dict[str, int | None] = {a.name: None for a in spec.arms}
        costs: dict[str, Any] = {}
        if flops is not None:
            vanilla_cfg = resolve_(VANILLA, protocol(None), "vanilla")
            vanilla = flops.step(vanilla_cfg) if vanilla_cfg is not None else None
            n = br.steps if br else (vanilla_cfg.train.steps if vanilla_cfg is not None else 0)
            for arm in spec.arms:
                extra = ref_extra if needs_reference(arm) else []
                cfg = resolve_(arm, [*protocol(None), *extra], arm.name)
                if cfg is None or vanilla is None:
                    continue
                uses_ref = cfg.sift.criterion == "reducible" and cfg.selecting
                ref_model = ref_cfg if needs_reference(arm) else None
                if uses_ref and ref_model is None:  # the arm's own reference: counted as the base model
                    ref_model = cfg
                costs[arm.name] = flops.step(cfg, ref_model if uses_ref else None)
                warmup = max(0, cfg.sift.warmup_steps - first) if cfg.selecting else 0
                steps[arm.name] = budget_steps(n, vanilla, costs[arm.name], warmup)
        for seed in spec.seeds:
            if warm is not None:
                add(VANILLA, seed, regime.out / "start" / f"seed{seed}", [f"train.steps={br.warm_steps}"], "start")
            for arm in spec.arms:
                extra = ref_extra if needs_reference(arm) else []
                plan = add(arm, seed, regime.out / "runs" / arm.name / f"seed{seed}", extra,
                           steps=steps[arm.name], cost=costs.get(arm.name))
                if plan is None:
                    continue
                if extra and ref_plan is not None:
                    plan.deps = [*plan.deps, ref_plan.key]
                select = selection_of(plan.config)
                plan.probe = ["--run", str(plan.dir), "--select", select, *kinds] if select and kinds else []
        if warm is not None and kinds:  # every selection at the branch point; reducible ones need the reference
            selects = sorted({s for p in plans if (s := selection_of(p.config))})
            reducible = {s for s in selects if parse_selection(s).criterion == "reducible"}
            ref_path = next((o.partition("=")[2] for o in ref_extra if o.startswith("sift.reference=")), None)
            if ref_plan is None or ref_path is None:  # arms with references of their own: not at the branch point
                selects, reducible = [s for s in selects if s not in reducible], set()
            warm.probe = ["--run", str(warm.dir), *(a for s in selects for a in ("--select", s)), *kinds] if selects else []
            if reducible:
                warm.probe += ["--reference", str(ref_path)]
                warm.deps = [*warm.deps, ref_plan.key]
    if problems:
        unique = list(dict.fromkeys(problems))
        raise StudyError(f"{spec.source}: the run config is not usable:\n  " + "\n  ".join(unique))
    return plans


def comparable(config: dict[str, Any]) -> dict[str, Any]:
    """A run config without what cannot change its result: its locations (a study directory or its data
    may move; the data's identity is checked through the hash of its index.json instead) and, for
    vanilla, the selection settings it never reads (so a vanilla run can be shared between studies that
    differ only in those)."""
    out = json.loads(json.dumps(config))
    out.get("data", {}).pop("path", None)
    out.get("data", {}).pop("extra_eval", None)  # locations too; the main data's hash identifies the study
    out.get("train", {}).pop("out_dir", None)
    if out.get("sift", {}).get("policy") == "none":
        out["sift"] = {"policy": "none"}
    return out


def without_new_defaults(config: dict[str, Any], old: dict[str, Any],
                         defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """``config`` without the keys ``old`` lacks that hold their default: knobs a later version of the
    engine added (a ``vcas`` section, say) do not make the runs made before them foreign."""
    if defaults is None:
        defaults = to_dict(load_config(None, []))
    out = {}
    for k, v in config.items():
        if k not in old:
            if k in defaults and v == defaults[k]:
                continue
            out[k] = v
        elif isinstance(v, dict) and isinstance(old[k], dict) and isinstance(defaults.get(k), dict):
            out[k] = without_new_defaults(v, old[k], defaults[k])
        else:
            out[k] = v
    return out


def check_marker(plan: RunPlan, data_id: dict[str, Any]) -> None:
    """Refuse to continue or reuse a run made with another config or other data."""
    marker = plan.dir / MARKER
    if not marker.is_file():
        return
    try:
        made = json.loads(marker.read_text())
    except (ValueError, OSError):
        raise StudyError(f"{marker} is unreadable; delete {plan.dir} to redo that run") from None
    old = made.get("config") or {}
    same_config = comparable(old) == comparable(without_new_defaults(plan.config, old))
    if not same_config or made.get("data", {}).get("index_sha256") != data_id["index_sha256"]:
        what = "config" if not same_config else "data (index.json differs)"
        raise StudyError(f"{plan.dir} was made with another {what}; use another --out, or delete that "
                         "directory to redo the run")


def write_marker(plan: RunPlan, data_id: dict[str, Any]) -> None:
    plan.dir.mkdir(parents=True, exist_ok=True)
    (plan.dir / MARKER).write_text(json.dumps({"arm": plan.arm.name, "seed": plan.seed, "config": plan.config,
                                               "data": data_id}, indent=1))


# ----------------------------------------------------------------------------- data


def ensure_data(spec: StudySpec, data: Path) -> None:
    """A prepared dataset at ``data``; made with the study's prepare recipe when it has one."""
    if (data / "index.json").is_file():
        return
    if spec.prepare is None:
        raise StudyError(f"no prepared dataset at {data} (index.json missing): make one with "
                         f"`sift prepare INPUTS --out {data} --seq-len 128 ...`, or pass --data DIR")
    inputs = [str(Path(p).resolve()) for p in spec.prepare.inputs]
    missing = [i for i, p in zip(spec.prepare.inputs, inputs) if not Path(p).exists()]
    if missing:
        raise StudyError(f"the study prepares its data from {', '.join(missing)} (relative to the current "
                         "directory: run it from the repository root), "
                         f"which is not there; pass --data DIR with shards made by `sift prepare`")
    if data.exists() and any(data.iterdir()):
        raise StudyError(f"{data} exists but holds no complete dataset (no index.json); remove it or pass --data")
    cmd = [sys.executable, "-m", "data_pipeline.prepare", *inputs, "--out", str(data), *spec.prepare.args]
    log.info("preparing the data: %s", shlex.join(cmd))
    if subprocess.run(cmd, env=child_env({})).returncode != 0:
        raise StudyError(f"`sift prepare` failed; see its message above ({shlex.join(cmd)})")


def regimes_of(spec: StudySpec, data: Path, out: Path, *, names: list[str] | None, build: bool) -> list[Regime]:
    """The datasets the grid runs on. With `study.regimes`: ``data`` is the root the regimes are built
    in (built now when ``build``), one Regime per name; otherwise ``data`` itself (prepared now with the
    study's recipe when ``build``)."""
    if spec.regimes is None:
        if names:
            raise StudyError("--regimes needs a study file with a `study.regimes` section")
        if build:
            ensure_data(spec, data)
        elif not (data / "index.json").is_file():
            log.warning("no prepared dataset at %s yet", data)
        return [Regime("", data, out)]
    from study.regimes import HELDOUT, RegimeConfig
    from study.regimes import build as build_regimes

    tree = dict(spec.regimes)
    source = Path(str(tree.get("input", "")))
    tree["input"] = str(source.resolve())
    cfg = RegimeConfig.from_dict(tree)
    unknown = [n for n in names or [] if n not in cfg.names]
    if unknown:
        raise StudyError(f"--regimes: {', '.join(unknown)} not among the study's regimes ({', '.join(cfg.names)})")
    cfg.names = [n for n in cfg.names if not names or n in names]
    manifest_path = data / "regimes.json"
    if build:
        if not Path(cfg.input).is_file():
            raise StudyError(f"the study builds its data from {source} (relative to the current directory), which is not "
                             "there; set study.regimes.input to a corpus, or pass --data with regimes built by "
                             "`python -m study.regimes`")
        manifest = build_regimes(cfg, data)
    elif manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
    else:
        log.warning("no regimes built in %s yet", data)
        manifest = {"regimes": {}}
    regimes = []
    for name in cfg.names:
        info = manifest.get("regimes", {}).get(name, {})
        shares = info.get("char_share", {})
        kinds = {k: (data / rel, shares.get(k, 0.0)) for k, rel in info.get("kind_data", {}).items()}
        heldout = {HELDOUT: data / HELDOUT} if "heldout" in manifest else {}
        regimes.append(Regime(name, data / name, out / name, heldout, kinds))
    return regimes


# ----------------------------------------------------------------------------- provenance


# ----------------------------------------------------------------------------- command line


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sift study", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Arms: vanilla, random, loss:J, entropy:J, reducible:J, stratified-loss:J, "
                                       "stratified-entropy:J, importance-loss:J, importance-entropy:J (J = a layer, "
                                       "L or L/2), or default.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=sorted(PRESETS), help="a study preset under configs/ (default: cpu)")
    src.add_argument("--config", help="a study YAML (a run config plus a `study:` section) or a plain run config")
    p.add_argument("--name", help="the study's name in reports and the default --out (default: from the file)")
    p.add_argument("--data", help="prepared shards (a `sift prepare` output directory); overrides data.path")
    p.add_argument("--out", help="study directory (runs, logs; default: runs/<study name>)")
    p.add_argument("--report", help="where the report goes (default: <out>/report)")
    p.add_argument("--seeds", help="a count (3 means 0,1,2) or a list (0,1,2; a single seed: 5,)")
    p.add_argument("--arms", help="comma-separated arms, e.g. vanilla,random,loss:1,entropy:L/2, or names of the "
                   "study file's arms such as vcas (default: the file's arms)")
    p.add_argument("--targets", help="validation accuracies for time-to-target, e.g. 0.30,0.35, or auto")
    p.add_argument("--parallel", type=int, help="runs at a time (default 1; on CPU the cores are shared out)")
    p.add_argument("--report-only", action="store_true", help="do not train: report on the runs there are")
    p.add_argument("--dry-run", action="store_true", help="print the plan (arms, seeds, run states) and exit")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep finished runs' checkpoints")
    p.add_argument("--regimes", help="with a `study.regimes` section: only these, e.g. clean,noisy")
    p.add_argument("--warm-steps", type=int, help="the continuation protocol: vanilla warm-up steps (study.warm.steps)")
    p.add_argument("--continue-steps", type=int, help="the continuation protocol: steps per arm (study.continue_steps)")
    p.add_argument("overrides", nargs="*", help="run-config overrides for every arm, e.g. train.steps=300")
    return p.parse_args(argv)


def resolve_paths(args: argparse.Namespace, spec: StudySpec) -> tuple[Path, Path, Path]:
    data = Path(args.data) if args.data else Path(spec.base.get("data", {}).get("path", ""))
    out = Path(args.out) if args.out else Path("runs") / spec.name
    report = Path(args.report) if args.report else out / "report"
    return data.resolve(), out.resolve(), report.resolve()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    setup_logging()
    source = Path(args.config) if args.config else PRESETS[args.preset or "cpu"]
    spec = build_spec(source, seeds=args.seeds, arms=args.arms, targets=args.targets,
                      parallel=args.parallel, overrides=args.overrides, warm_steps=args.warm_steps,
                      continue_steps=args.continue_steps)
    spec.name = args.name or spec.name
    data, out, report_dir = resolve_paths(args, spec)
    names = [n.strip() for n in args.regimes.split(",") if n.strip()] if args.regimes else None
    regimes = regimes_of(spec, data, out, names=names, build=not (args.report_only or args.dry_run))
    data_ids = {r.name: data_fingerprint(r.data) if (r.data / "index.json").is_file() else {"index_sha256": None}
                for r in regimes}
    plans = {r.name: plan_runs(spec, r) for r in regimes}
    if not args.report_only:
        for r in regimes:
            for plan in plans[r.name]:
                check_marker(plan, data_ids[r.name])
    every = [p for r in regimes for p in plans[r.name]]

    if args.dry_run:
        print(f"study {spec.name} (budget: {spec.budget}): {len(spec.arms)} arms x {len(spec.seeds)} seeds"
              f"{f' x {len(regimes)} regimes' if regimes[0].name else ''} = {len(every)} jobs -> {out}")
        for plan in every:
            state, step = run_state(plan)
            cost = f"  {plan.flops.total:.4g} FLOPs/step" if plan.flops is not None else ""
            what = ' '.join(plan.arm.overrides) if plan.kind == 'run' else plan.kind
            print(f"  {plan.key:<36} {state}{f' (step {step})' if state == 'partial' else ''}  "
                  f"{plan.steps} steps{cost}  {what}")
        return 0

    out.mkdir(parents=True, exist_ok=True)
    record = write_study_record(out, spec, data, data_ids, argv, invocation=not args.report_only)
    codes: dict[str, int] = {}
    if not args.report_only:
        for r in regimes:
            for plan in plans[r.name]:  # each was checked against its marker above
                if not (plan.dir / MARKER).is_file():
                    write_marker(plan, data_ids[r.name])
        events = EventLog(out / "study-log.jsonl")
        t0, load0 = time.time(), load_average()
        signal.signal(signal.SIGTERM, _interrupt)  # a killed study stops its runs too, resumably
        try:
            codes = execute(every, parallel=spec.parallel, events=events, keep_checkpoints=args.keep_checkpoints,
                            env={})
        except KeyboardInterrupt:
            print("sift study: interrupted; rerun the same command to continue", file=sys.stderr)
            return 130
        record["invocations"][-1].update({"seconds": round(time.time() - t0, 1), "load_before": load0,
                                          "load_after": load_average(), "ran": codes})
        (out / "study.json").write_text(json.dumps(record, indent=1))

    if args.report_only:
        probe_finished(every)
    from study.output import render_report, write_report, write_verdict

    tables = {}
    for r in regimes:
        where = report_dir / r.name if r.name else report_dir
        if args.report_only and not any(p.dir.is_dir() for p in plans[r.name]) and (where / "results.json").is_file():
            tables[r.name] = render_report(where, spec, regime=r.name)  # a committed study: its compact form
        else:
            tables[r.name] = write_report(where, spec, plans[r.name], record, regime=r.name)
    if regimes[0].name:
        print(write_verdict(report_dir, spec, {r.name: report_dir / r.name for r in regimes}, record))
    else:
        print(tables[""])
    failed = sorted(k for k, rc in codes.items() if rc != 0)
    if failed:
        print(f"sift study: {len(failed)} run(s) failed: {', '.join(failed)}; their train.log says why; "
              "rerun the same command to retry them", file=sys.stderr)
        return 1
    return 0


def probe_finished(plans: list[RunPlan]) -> None:
    """The probes of finished runs that lack some of their selections (runs made before the probe knew
    them; a run trained but not yet probed), in this process, before a report: each adds what is missing
    to the run's probe.json. A run whose checkpoints are gone (a study without --keep-checkpoints) is
    skipped with a warning, and its kept-row shares stay out of the report."""
    from study.jobs import probe_missing
    from study.probe import parse_args as probe_args
    from study.probe import run_probe

    todo = [p for p in plans if run_state(p)[0] == "probe"]
    for i, plan in enumerate(todo):
        log.info("probing %s (%d of %d): %s", plan.key, i + 1, len(todo), ", ".join(probe_missing(plan)))
        try:
            run_probe(probe_args(plan.probe))
        except SiftError as e:
            log.warning("%s: no probe (%s); its kept-row shares are left out of the report", plan.key, e)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def write_study_record(out: Path, spec: StudySpec, data: Path, data_ids: dict[str, dict[str, Any]], argv: list[str], *,
                       invocation: bool = True) -> dict[str, Any]:
    """<out>/study.json: the spec, the data and one entry per training invocation (command, machine,
    versions); a report-only invocation adds none."""
    path = out / "study.json"
    record: dict[str, Any] = {}
    if path.is_file():
        with contextlib.suppress(ValueError, OSError):
            record = json.loads(path.read_text())
    record.update({
        "name": spec.name, "source": _repo_relative(Path(spec.source)), "seeds": spec.seeds,
        "arms": [a.name for a in spec.arms], "arm_overrides": {a.name: list(a.overrides) for a in spec.arms},
        "num_layers": spec.num_layers, "targets": spec.targets,
        "parallel": spec.parallel, "base": spec.base, "overrides": [portable_arg(o) for o in spec.overrides],
        "data": {"path": data.name, **data_ids.get("", {"regimes": data_ids})},
        "branch": None if spec.branch is None else dataclasses.asdict(spec.branch),
        "reference": spec.reference, "control": spec.control, "budget": spec.budget,
    })
    record.setdefault("invocations", [])
    if invocation:
        record["invocations"].append({
            "command": shlex.join(["sift", "study", *map(portable_arg, argv)]),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "commit": git_commit(), "machine": {**machine(), "versions": versions()},
        })
    path.write_text(json.dumps(record, indent=1))
    return record


def portable_arg(arg: str) -> str:
    """A command-line argument without machine-specific directories: paths under the working directory
    (the checkout, when run from it) become relative to it, other absolute paths keep only their last
    component (`.../english-128`)."""
    key, sep, value = arg.rpartition("=") if "=" in arg and not arg.startswith("/") else ("", "", arg)
    if not value.startswith("/"):
        return arg
    path = Path(value)
    with contextlib.suppress(ValueError):
        return f"{key}{sep}{path.resolve().relative_to(Path.cwd().resolve())}"
    return f"{key}{sep}.../{path.name}"


def _repo_relative(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    return str(path)
