"""What a study runs: its arms, seeds and targets, the base run config, and how an arm becomes overrides.

A study file is a run config (the sections of engine/config.py) plus a `study:` section:

    study:
      name: study-cpu
      seeds: [0, 1, 2]
      arms: default            # or a list: [vanilla, random, "loss:1", "entropy:L/2", "loss:L"]
      targets: auto            # or a list of validation MLM accuracies, e.g. [0.30, 0.35]
      parallel: 1              # runs at a time
      prepare:                 # optional: how to make data.path when it does not exist
        inputs: [../shared/corpus/english-reference.parquet]   # relative to the repository root
        args: [--text-field, text, --seq-len, "128", --vocab-size, "8192"]

Every arm shares the base config, hence the same shards, validation split, evaluation schedule and
step count; an arm is a name plus run-config overrides (the shorthands vanilla, random, loss:J and
entropy:J expand to sift.* overrides). The continuation protocol adds

      warm: {steps: 1000, seed: 0}   # one vanilla run from random init, saved once per data regime
      continue_steps: 600            # every arm and seed continues it for this many optimizer steps
      regimes: {...}                 # optional: clean / redundant / noisy variants of one corpus
      reference: vanilla             # the arm the others are compared with (default vanilla)
      control: random                # the second comparison (default random)

and equal compute (study/budget.py) adds

      budget: flops                  # samples (default): equal steps; flops: vanilla's counted FLOPs per arm
      reference_model: {steps: 800, overrides: [...]}   # the reference reducible arms get (`sift reference`)
      extra_arms: [{name: vcas, overrides: [method=vcas]}]   # named arms that run only when --arms names them
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from engine.models.presets import FAMILY_PRESETS
from sift_common.errors import SiftError

ARM_GRAMMAR = ("vanilla | random | loss:J | entropy:J | reducible:J | stratified-loss:J | stratified-entropy:J | "
               "importance-loss:J | importance-entropy:J (J a layer number, L or L/2), the name of an arm of "
               "the study file, or a mapping {name: ..., overrides: [key=value, ...], label: ...}")
STUDY_KEYS = ("name", "seeds", "arms", "targets", "parallel", "prepare", "reference", "control", "warm",
              "continue_steps", "regimes", "budget", "reference_model", "extra_arms")
# stratified keeps every row above this quantile of the gross batch's scores (a quarter of G, half of B at
# keep 0.5) and draws the rest of B from the rows below. The default threshold, the batch mean, lies below
# the median of a right-skewed loss distribution, so B or more rows often sit above it and the draw
# degenerates to plain top-k (logged as stratified_overflow).
STRATIFIED_QUANTILE = 0.75
# Set by the study for every run; overriding them for the whole study would silently merge runs.
RUN_KEYS = ("train.seed", "train.out_dir")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


class StudyError(SiftError, ValueError):
    """A study the user asked for that cannot run (bad preset, arm, seed list, data path)."""


@dataclass(frozen=True, slots=True)
class Arm:
    """One configuration of the grid: a name (also its directory) and the run-config overrides that make
    it. Nothing else in the study or its report depends on what the overrides say, so a new method is
    an arm in a study file, e.g. ``{name: vcas, overrides: [method=vcas]}``."""

    name: str
    overrides: tuple[str, ...]
    label: str = ""

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise StudyError(f"arm name {self.name!r}: use letters, digits and _ . + - (it names a directory)")
        bad = [o for o in self.overrides if "=" not in o or not o.partition("=")[0].strip()]
        if bad:
            raise StudyError(f"arm {self.name!r}: override(s) {', '.join(map(repr, bad))} are not key=value")

    def keys(self) -> set[str]:
        return {o.partition("=")[0].strip() for o in self.overrides}

    def title(self) -> str:
        """How plots and tables name the arm."""
        return self.label or self.name


VANILLA = Arm("vanilla", ("sift.policy=none", "sift.schedule=serial"), "vanilla (B per step)")
# The control draws the same G and keeps B at random. It still runs the cheapest scorer (exit 1), so its
# wall clock carries the same scoring cost as exit-1 SIFT and only the choice of rows differs.
RANDOM = Arm("random", ("sift.policy=random", "sift.criterion=loss", "sift.exit_layer=1"), "random B of G (control)")


def default_exits(num_layers: int) -> list[int]:
    """{1, 2, L/2, L} within 1..L, deduplicated: [1, 2] for L = 2, [1, 2, 4] for 4, [1, 2, 6, 12] for 12."""
    return sorted({j for j in (1, 2, num_layers // 2, num_layers) if 1 <= j <= num_layers})


def sift_arm(criterion: str, exit_layer: int) -> Arm:
    return Arm(f"{criterion}-{exit_layer}",
               ("sift.policy=topk", f"sift.criterion={criterion}", f"sift.exit_layer={exit_layer}"),
               f"{criterion}-SIFT, exit {exit_layer}")


def weighted_arm(policy: str, criterion: str, exit_layer: int) -> Arm:
    """An unbiased arm: ``stratified`` (InfoBatch's rule) or ``importance`` (Horvitz-Thompson) draws."""
    extra = (f"sift.threshold_quantile={STRATIFIED_QUANTILE}",) if policy == "stratified" else ()
    return Arm(f"{policy}-{criterion}-{exit_layer}",
               (f"sift.policy={policy}", f"sift.criterion={criterion}", f"sift.exit_layer={exit_layer}", *extra),
               f"{policy} {criterion}, exit {exit_layer}")


def needs_reference(arm: Arm) -> bool:
    """Does the arm score by reducible loss without naming its reference (the study trains one)?"""
    return "sift.criterion=reducible" in arm.overrides and not any(o.startswith("sift.reference=") for o in arm.overrides)


def default_arms(num_layers: int) -> list[Arm]:
    exits = default_exits(num_layers)
    return [VANILLA, RANDOM, *(sift_arm(c, j) for c in ("loss", "entropy") for j in exits)]


def _layer(token: str, num_layers: int, spec: str) -> int:
    token = token.strip().upper()
    if token == "L":
        return num_layers
    if token == "L/2":
        return max(1, num_layers // 2)
    if not re.fullmatch(r"\d+", token):
        raise StudyError(f"arm {spec!r}: exit {token!r} is not a layer number, L or L/2 ({ARM_GRAMMAR})")
    j = int(token)
    if not 1 <= j <= num_layers:
        raise StudyError(f"arm {spec!r}: exit layer {j} outside 1..{num_layers} (the model has {num_layers} layers)")
    return j


def parse_arm(spec: Any, num_layers: int, named: dict[str, Arm] | None = None) -> Arm:
    """A shorthand (`vanilla`, `random`, `loss:J`, `entropy:J`), the name of one of the ``named`` arms (the
    study file's, so `--arms vcas` picks its `vcas` mapping), or a mapping {name, overrides, label}."""
    if isinstance(spec, dict):
        unknown = sorted(set(spec) - {"name", "overrides", "label"})
        if unknown or not spec.get("name") or not isinstance(spec.get("overrides", []), list):
            raise StudyError(f"arm {spec!r}: expected {{name: ..., overrides: [key=value, ...], label: ...}}")
        return Arm(str(spec["name"]), tuple(str(o) for o in spec.get("overrides") or []), str(spec.get("label") or ""))
    if named and str(spec).strip() in named:
        return named[str(spec).strip()]
    text = str(spec).strip().lower()
    if text == "vanilla":
        return VANILLA
    if text == "random":
        return RANDOM
    criterion, sep, layer = text.partition(":")
    from engine.scoring import CRITERIA

    if criterion in CRITERIA and sep:
        return sift_arm(criterion, _layer(layer, num_layers, spec))
    policy, _, scored = criterion.partition("-")
    if policy in ("stratified", "importance") and scored in ("loss", "entropy") and sep:
        return weighted_arm(policy, scored, _layer(layer, num_layers, spec))
    raise StudyError(f"arm {spec!r} is not understood; expected {ARM_GRAMMAR}")


def parse_arms(specs: Any, num_layers: int, named: dict[str, Arm] | None = None) -> list[Arm]:
    """A list of arm specs (or "default"), deduplicated in order; the `default` token expands in place;
    comma-separated shorthands are split; a bare name of one of the ``named`` arms selects it. Two
    different arms with one name are an error."""
    items = [specs] if isinstance(specs, (str, dict)) else list(specs)
    arms: list[Arm] = []
    for item in items:
        parts = [item] if isinstance(item, dict) else [s for s in str(item).split(",") if s.strip()]
        for spec in parts:
            is_default = isinstance(spec, str) and spec.strip().lower() == "default"
            for arm in default_arms(num_layers) if is_default else [parse_arm(spec, num_layers, named)]:
                same = [a for a in arms if a.name == arm.name]
                if same and same[0] != arm:
                    raise StudyError(f"two different arms are named {arm.name!r}")
                if not same:
                    arms.append(arm)
    if not arms:
        raise StudyError("no arms to run")
    return arms


@dataclass(frozen=True, slots=True)
class Branch:
    """The continuation protocol: one vanilla warm-up run of ``warm_steps`` from random init (seed
    ``warm_seed``), saved once; every arm and seed continues from its checkpoint for ``steps`` more
    optimizer steps, on one LR schedule over warm_steps + steps."""

    warm_steps: int
    steps: int
    warm_seed: int = 0

    @property
    def total(self) -> int:
        return self.warm_steps + self.steps


def _branch(warm: Any, steps: Any) -> Branch | None:
    if warm is None and steps is None:
        return None
    if not isinstance(warm, dict) or steps is None:
        raise StudyError("study.warm ({steps: W, seed: S}) and study.continue_steps (C) go together")
    unknown = sorted(set(warm) - {"steps", "seed"})
    if unknown:
        raise StudyError(f"study.warm: unknown key(s) {', '.join(unknown)} (known: steps, seed)")
    try:
        branch = Branch(int(warm["steps"]), int(steps), int(warm.get("seed", 0)))
    except (KeyError, TypeError, ValueError):
        raise StudyError(f"study.warm.steps and study.continue_steps must be integers, got {warm!r}, {steps!r}") from None
    if branch.warm_steps < 1 or branch.steps < 1 or branch.warm_seed < 0:
        raise StudyError(f"study.warm.steps and study.continue_steps must be >= 1 (got {branch.warm_steps}, "
                         f"{branch.steps}); study.warm.seed >= 0")
    return branch


@dataclass(slots=True)
class PrepareRecipe:
    """`sift prepare INPUTS --out data.path ARGS`, run when data.path holds no dataset yet."""

    inputs: list[str]
    args: list[str]


@dataclass(slots=True)
class StudySpec:
    name: str
    seeds: list[int]
    arms: list[Arm]
    targets: list[float] | None  # None: derived from the reference arm (see report.auto_targets)
    parallel: int
    base: dict[str, Any]  # the run-config tree shared by every arm
    num_layers: int
    prepare: PrepareRecipe | None = None
    source: str = ""
    overrides: list[str] = field(default_factory=list)
    reference: str = "vanilla"  # the arm every other is compared with, paired by seed
    control: str = "random"  # the second comparison: same draws, rows kept at random
    branch: Branch | None = None  # None: every run trains from random init for train.steps
    regimes: dict[str, Any] | None = None  # the `study.regimes` section (study/regimes.py)
    budget: str = "samples"  # samples: every arm runs the same steps; flops: vanilla's counted FLOPs (study/budget.py)
    reference_model: ReferenceModel | None = None  # how the study trains the reference of reducible arms


@dataclass(frozen=True, slots=True)
class ReferenceModel:
    """`study.reference_model`: the reference the study trains for reducible arms (`sift reference`, once
    per regime): ``steps`` optimizer steps from random init, with ``overrides`` of the base run config
    (e.g. a smaller model.preset)."""

    steps: int
    overrides: tuple[str, ...] = ()


def _reference_model(value: Any, branch: Branch | None, base: dict[str, Any]) -> ReferenceModel:
    value = value or {}
    if not isinstance(value, dict) or set(value) - {"steps", "overrides"}:
        raise StudyError(f"study.reference_model: expected {{steps: N, overrides: [key=value, ...]}}, got {value!r}")
    default = branch.warm_steps if branch else int((base.get("train") or {}).get("steps", 0) or 0)
    try:
        steps = int(value.get("steps", default))
    except (TypeError, ValueError):
        raise StudyError(f"study.reference_model.steps must be an integer, got {value.get('steps')!r}") from None
    overrides = tuple(str(o) for o in value.get("overrides") or [])
    if steps < 1 or any("=" not in o for o in overrides):
        raise StudyError(f"study.reference_model: steps >= 1 and key=value overrides, got {value!r}")
    return ReferenceModel(steps, overrides)


def model_layers(tree: dict[str, Any]) -> int:
    model = tree.get("model") or {}
    if model.get("num_layers"):
        return int(model["num_layers"])
    family, preset = model.get("family", "bert"), model.get("preset", "tiny")
    sizes = FAMILY_PRESETS.get(family, {})
    if preset not in sizes:
        raise StudyError(f"model.preset {preset!r} is not one of {', '.join(sizes)} (the {family} sizes)")
    return sizes[preset].num_layers


def _seeds(value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise StudyError(f"study.seeds: a count must be >= 1, got {value}")
        return list(range(value))
    if isinstance(value, str):
        if value.strip().isdigit():  # "3": a count, like the YAML integer; "5," is the single seed 5
            return _seeds(int(value))
        value = [v for v in re.split(r"[,\s]+", value) if v]
    try:
        seeds = [int(v) for v in value]
    except (TypeError, ValueError):
        raise StudyError(f"study.seeds: expected a count or a list of integers, got {value!r}") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise StudyError(f"study.seeds: expected distinct non-negative integers, got {value!r}")
    return seeds


def _targets(value: Any) -> list[float] | None:
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    if isinstance(value, str):
        value = [v for v in re.split(r"[,\s]+", value) if v]
    if isinstance(value, (int, float)):
        value = [value]
    try:
        targets = sorted({float(v) for v in value})
    except (TypeError, ValueError):
        raise StudyError(f"study.targets: expected 'auto' or accuracies in (0, 1), got {value!r}") from None
    if not targets or not all(0.0 < t < 1.0 for t in targets):
        raise StudyError(f"study.targets: expected 'auto' or accuracies in (0, 1), got {value!r}")
    return targets


def _prepare(value: Any) -> PrepareRecipe | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not value.get("inputs"):
        raise StudyError("study.prepare: expected a mapping with `inputs` (and optional `args`)")
    return PrepareRecipe([str(v) for v in value["inputs"]], [str(v) for v in value.get("args") or []])


def read_study_file(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A study or run config YAML -> (study section, run-config tree)."""
    try:
        tree = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise StudyError(f"cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise StudyError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise StudyError(f"{path}: the top level must be a mapping of sections")
    study = tree.pop("study", None) or {}
    if not isinstance(study, dict):
        raise StudyError(f"{path}: `study` must be a mapping")
    unknown = sorted(set(study) - set(STUDY_KEYS))
    if unknown:
        raise StudyError(f"{path}: unknown study key(s) {', '.join(unknown)} (known: {', '.join(STUDY_KEYS)})")
    return study, tree


def build_spec(path: str | Path, *, seeds: Any = None, arms: Any = None, targets: Any = None,
               parallel: int | None = None, overrides: list[str] | None = None, warm_steps: int | None = None,
               continue_steps: int | None = None) -> StudySpec:
    """The study file plus command-line choices (which win over the file's `study` section)."""
    study, tree = read_study_file(path)
    if warm_steps is not None:
        study["warm"] = {**(study.get("warm") or {}), "steps": warm_steps}
    if continue_steps is not None:
        study["continue_steps"] = continue_steps
    overrides = list(overrides or [])
    layers = model_layers(_with_overrides(tree, overrides))
    file_arms = parse_arms(study.get("arms", "default"), layers)
    # study.extra_arms: named arms that run only when --arms names them
    extra = parse_arms(study["extra_arms"], layers) if study.get("extra_arms") else []
    arm_list = file_arms if arms is None else parse_arms(arms, layers, {a.name: a for a in [*extra, *file_arms]})
    branch = _branch(study.get("warm"), study.get("continue_steps"))
    reserved = set(RUN_KEYS).union(*(a.keys() for a in arm_list))
    if branch is not None or str(study.get("budget", "")).strip().lower() == "flops":
        reserved |= {"train.steps", "optim.schedule_steps"}
    clash = [o for o in overrides if o.partition("=")[0].strip() in reserved]
    if clash:
        raise StudyError(f"override(s) {', '.join(clash)} would change what an arm is (or the study's protocol); "
                         "use --arms/--seeds, or the study file's warm/continue_steps, instead")
    n_parallel = parallel if parallel is not None else int(study.get("parallel", 1))
    if n_parallel < 1:
        raise StudyError(f"parallel must be >= 1, got {n_parallel}")
    budget = str(study.get("budget", "samples")).strip().lower()
    from study.budget import BUDGETS

    if budget not in BUDGETS:
        raise StudyError(f"study.budget: {budget!r} is not one of {', '.join(BUDGETS)}")
    regimes = study.get("regimes")
    if regimes is not None and not isinstance(regimes, dict):
        raise StudyError("study.regimes: expected a mapping (see study/regimes.py)")
    return StudySpec(
        name=str(study.get("name") or Path(path).stem),
        seeds=_seeds(seeds if seeds is not None else study.get("seeds", 3)),
        arms=arm_list,
        targets=_targets(targets if targets is not None else study.get("targets")),
        parallel=n_parallel,
        base=tree,
        num_layers=layers,
        prepare=_prepare(study.get("prepare")),
        source=str(path),
        overrides=overrides,
        reference=str(study.get("reference", "vanilla")),
        control=str(study.get("control", "random")),
        branch=branch,
        regimes=regimes,
        budget=budget,
        reference_model=(_reference_model(study.get("reference_model"), branch, tree)
                         if any(needs_reference(a) for a in arm_list) else None),
    )


def _with_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """The tree with model.* overrides applied (enough to know the depth before full validation)."""
    out = copy.deepcopy(tree)
    for item in overrides:
        key, _, raw = item.partition("=")
        parts = key.strip().split(".")
        if len(parts) == 2 and parts[0] == "model":
            out.setdefault("model", {})[parts[1]] = yaml.safe_load(raw) if raw.strip() else None
    return out


@dataclass(frozen=True, slots=True)
class Selection:
    """What the probe (study/probe.py) simulates for a selecting arm: its policy, criterion, exit and the
    policy's knobs, as ``sift.*`` settings."""

    policy: str
    criterion: str
    exit_layer: int
    threshold_quantile: float | None = None  # stratified (None: the batch mean)
    temperature: float = 1.0  # importance
    uniform_mix: float = 0.1  # importance

    @property
    def key(self) -> str:
        """"criterion:exit" for top-k (the key of probes made before the weighted policies), else
        "policy-criterion:exit@knobs", e.g. "stratified-loss:1@q=0.75", "importance-loss:1@t=1.0,u=0.1"."""
        if self.policy == "topk":
            return f"{self.criterion}:{self.exit_layer}"
        knobs = (f"q={self.threshold_quantile if self.threshold_quantile is not None else 'mean'}"
                 if self.policy == "stratified" else f"t={self.temperature},u={self.uniform_mix}")
        return f"{self.policy}-{self.criterion}:{self.exit_layer}@{knobs}"

    @property
    def weighted(self) -> bool:
        return self.policy in ("stratified", "importance")


_SELECTION = re.compile(r"^(?:(stratified|importance)-)?([a-z]+):(\d+)(?:@(.*))?$")


def parse_selection(key: str) -> Selection:
    """The inverse of ``Selection.key``; StudyError naming the key when it is not one."""
    m = _SELECTION.match(key.strip())
    bad = StudyError(f"probe selection {key!r}: expected CRITERION:EXIT (top-k), stratified-CRITERION:EXIT@q=Q "
                     "or importance-CRITERION:EXIT@t=T,u=U")
    if m is None or (m.group(1) is None) != (m.group(4) is None):
        raise bad
    policy, criterion, exit_layer = m.group(1) or "topk", m.group(2), int(m.group(3))
    try:
        knobs = dict(kv.split("=", 1) for kv in m.group(4).split(",")) if m.group(4) else {}
        if policy == "stratified" and set(knobs) == {"q"}:
            q = None if knobs["q"] == "mean" else float(knobs["q"])
            return Selection(policy, criterion, exit_layer, threshold_quantile=q)
        if policy == "importance" and set(knobs) == {"t", "u"}:
            return Selection(policy, criterion, exit_layer, temperature=float(knobs["t"]),
                             uniform_mix=float(knobs["u"]))
        if policy == "topk":
            return Selection(policy, criterion, exit_layer)
    except ValueError:
        pass
    raise bad


def selection_of(config: dict[str, Any]) -> str | None:
    """The probe's key (``Selection.key``) of a run config that picks rows by their early-exit scores (top-k,
    stratified or importance, any criterion), else None (vanilla, the random control, VCAS alone)."""
    sift = config.get("sift", {})
    if sift.get("policy") not in ("topk", "stratified", "importance") or config.get("method") in ("none", "vcas"):
        return None
    return Selection(sift["policy"], str(sift.get("criterion", "loss")), int(sift.get("exit_layer", 1)),
                     sift.get("threshold_quantile"), float(sift.get("temperature", 1.0)),
                     float(sift.get("uniform_mix", 0.1))).key
