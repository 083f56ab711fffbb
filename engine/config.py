"""One typed config tree for a run, loaded from YAML plus dotted command-line overrides.

Loading collects every problem (unknown keys, wrong types, inconsistent values) and raises a single
``ConfigError`` that lists them all, so a user fixes a config in one pass.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from engine.methods.registry import METHODS, check_method, selects
from engine.methods.sift_config import SiftConfig
from engine.methods.vcas.config import VcasConfig, check_vcas
from engine.models.presets import FAMILY_PRESETS
from sift_common.errors import SiftError


class ConfigError(SiftError, ValueError):
    """A run config that cannot be used; the message lists every problem found."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass(kw_only=True, slots=True)
class DataConfig:
    path: str = "runs/demo/data"
    """Directory written by `sift prepare` (holds index.json)."""
    train_split: str = "train"
    eval_split: str = "validation"
    mask_prob: float = 0.15
    num_workers: int = 2
    """DataLoader worker processes per rank (0 = load in the training process)."""
    pin_memory: bool | None = None
    """None: pin when training on CUDA."""
    verify_checksums: bool = False
    """Hash every shard at open. Otherwise each shard is hashed the first time a row of it is read (sizes,
    row counts and every batch's token ranges are always checked)."""
    train_half: int | None = None
    """Train on one half (0 or 1) of the training split only: a fixed random halving of its rows
    (data_pipeline/sampler.py ``split_half``), e.g. a reference for the other half (`sift reference`)."""
    extra_eval: dict[str, str] = field(default_factory=dict)
    """More text to evaluate on at every evaluation: name -> a dataset directory prepared with the same
    tokenizer (its ``eval_split`` split). Its metrics land in the eval record as ``<name>_val_...``."""


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    family: str = "bert"
    """The model adapter (engine/models/): bert (masked LM), gpt2 or llama (causal LMs, on data prepared
    with --objective clm)."""
    preset: str = "tiny"
    """The family's size (engine/models/presets.py). bert: tiny, mini, small, medium, base, large; gpt2:
    tiny, 125m, 350m, 774m, 1.5b; llama: tiny, 125m, 350m, 1b."""
    init_from: str | None = None
    """A local Hugging Face checkpoint directory to start from instead of random init (its own size)."""
    hidden_size: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    """Llama: key/value heads (grouped-query attention)."""
    intermediate_size: int | None = None
    dropout: float = 0.1
    """Hidden and attention dropout (the paper: 0.1 on all layers; Llama has attention dropout only)."""
    attn_implementation: str = "sdpa"
    loss_chunk: int = 0
    """Decoders: run the LM head and the loss over this many positions at a time, recomputed in the
    backward (activation checkpointing), so the (B x T, V) logits and their fp32 buffers never exist at
    once, for large vocabularies and long rows; costs one more LM-head forward per step. 0: all at once."""


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    weight_decay: float = 0.01
    warmup_fraction: float = 0.002
    """Linear warm-up over this fraction of the schedule's horizon, then linear decay to 0 (the paper)."""
    schedule_steps: int | None = None
    """The LR schedule's horizon in optimizer steps (None: train.steps). A run that stops early and is
    continued later, e.g. a warm-up run of W steps continued to W + C by several runs, sets W + C here
    so that both parts follow one schedule; must be >= train.steps."""
    decay: str = "linear"
    """linear or constant after warm-up."""
    grad_clip: float = 1.0
    """Global gradient-norm clipping (0 = off); fills DeepSpeed's gradient_clipping."""
    fused: bool | None = None
    """torch's fused AdamW; None: on CUDA."""


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    steps: int = 200
    """Optimizer steps."""
    time_budget_s: float = 0.0
    """Stop early once this session has trained this many seconds (checked every step, or every log_every
    steps with several ranks; 0: no limit): evaluate, checkpoint and summarise as at the end. Running the
    same command again resumes."""
    micro_batch_size: int = 16
    """B: back-propagated sequences per rank per micro-step (DeepSpeed's train_micro_batch_size_per_gpu)."""
    grad_accum: int = 1
    seed: int = 0
    out_dir: str = "runs/demo/train"
    log_every: int = 10
    """Flush step metrics (one host sync) every N steps; each JSONL record averages those steps."""
    eval_every: int = 100
    eval_samples: int = 512
    """Validation sequences per evaluation (0 = the whole split), rounded down to a multiple of
    world size x eval_batch_size so that every rank runs the same number of full batches."""
    eval_batch_size: int = 32
    save_every: int = 0
    """Checkpoint every N steps (0 = only at the end)."""
    keep_last: int = 2
    resume: bool = True
    """Continue from the latest complete checkpoint in out_dir when there is one."""
    collective_timeout_s: float = 600.0
    """How long a rank may wait to join the process group or in one collective before it fails: the
    bound on how long the survivors of a silently lost node wait (a killed peer fails them at once); then
    a roll call of at most 10 s names the ranks that stopped answering (engine/ds.py ``peer_lost``)."""
    nonfinite: str = "skip"
    """What a non-finite loss does. skip: every micro-step reads one flag to the host and skips a
    micro-batch whose loss is non-finite on any rank (no backward, no step). stop: no per-step host read
    (for GPU throughput); the losses are counted on the device and read at each log flush, evaluation
    and checkpoint, and the first one found stops the run there: its weights are no longer trusted."""
    max_nonfinite: int = 5
    """skip: abort after this many non-finite losses in a row. Either way the diverged state is saved
    aside as ``diverged-step<N>``, never over the last good checkpoint, which the message names."""
    compile: bool = False
    """torch.compile each of the model's blocks (the scorer reuses the first j; its replicas stay eager).
    Trains like eager on CPU (tests/e2e); whether it is faster is for `sift bench --compile both` on a GPU."""
    plugins: list[str] = field(default_factory=list)
    """Python modules to import before the config is checked; they may register model families,
    methods, selection policies, scoring criteria and loop hooks (engine/hooks.py)."""
    progress: bool | None = None
    """Progress bar; None: when stderr is a terminal."""
    tensorboard: bool = True
    stop_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGINT", "SIGUSR1"])
    """Signals that stop the run after the current optimizer step, with a checkpoint and exit status 75
    (engine/stopping.py): what SLURM and Kubernetes send before SIGKILL, Ctrl-C, and SLURM's early
    warning (``--signal=USR1@120``). [] keeps Python's default handling."""
    check_free_space: bool = True
    """Before each save, refuse to start it when the file system holds less free space than the last
    checkpoint took (the run ends with a clear error; the previous checkpoint stays intact)."""


@dataclass(kw_only=True, slots=True)
class DeepSpeedConfig:
    config: str = "ds_configs/zero1.json"
    """DeepSpeed JSON; "auto" fields are filled from this run config."""
    precision: str = "auto"
    """auto (bf16 on CUDA that supports it, else fp32), fp32, bf16 or fp16; fills bf16/fp16 "enabled"."""
    zero_stage: int | None = None
    """Override zero_optimization.stage of the JSON."""
    dist_backend: str | None = None
    """None: nccl on CUDA, gloo on CPU."""


@dataclass(kw_only=True, slots=True)
class RunConfig:
    method: str = "sift"
    """The training method(s): none (vanilla: draw B rows, train on all), sift, or several joined with
    "+" (at most one of them selecting rows). See engine/methods/."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sift: SiftConfig = field(default_factory=SiftConfig)
    vcas: VcasConfig = field(default_factory=VcasConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    @property
    def effective_method(self) -> str:
        """``method``, with the older spelling of vanilla (``sift.policy: none``) resolved."""
        return "none" if self.sift.policy == "none" else self.method

    @property
    def selecting(self) -> bool:
        """Does one of the methods select rows (draw G = B / sift.keep, train on B)?"""
        return selects(self.effective_method)

    @property
    def gross_batch_size(self) -> int:
        """G = B / keep when a method selects rows; B otherwise."""
        B = self.train.micro_batch_size
        return self.sift.gross_batch(B) if self.selecting else B


def choices() -> dict[str, tuple[str, ...]]:
    """Allowed values of the enumerated keys; the registries decide, so a plugin's additions count."""
    from engine.models.registry import FAMILIES
    from engine.scoring import CRITERIA
    from engine.selection import POLICIES

    return {
        "sift.policy": (*POLICIES, "none"),
        "sift.criterion": tuple(CRITERIA),
        "sift.schedule": ("serial", "pipelined"),
        "train.nonfinite": ("skip", "stop"),
        "optim.decay": ("linear", "constant"),
        "deepspeed.precision": ("auto", "fp32", "bf16", "fp16"),
        "model.family": tuple(FAMILIES),
        "model.attn_implementation": ("sdpa", "eager", "flash_attention_2"),
    } | {"method": ("none", *METHODS)}


def load_plugins(modules: list[str]) -> list[str]:
    """Import each plugin module (its registrations take effect); returns the problems."""
    import importlib

    problems = []
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as e:  # any failure of user code is a config problem naming the module
            problems.append(f"train.plugins: cannot import {name!r}: {e.__class__.__name__}: {e}")
    return problems


def validate(cfg: RunConfig) -> list[str]:
    """Cross-field checks; returns every problem (empty when the config is usable)."""
    p: list[str] = load_plugins(cfg.train.plugins)
    allowed_values = choices()
    p += check_method(cfg.method, allowed_values.pop("method"))
    for key, allowed in allowed_values.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            p.append(f"{key}: {value!r} is not one of {', '.join(allowed)}")
    sizes = FAMILY_PRESETS.get(cfg.model.family)
    if sizes is not None and cfg.model.preset not in sizes:
        p.append(f"model.preset: {cfg.model.preset!r} is not one of {', '.join(sizes)} (the {cfg.model.family} sizes)")
    if cfg.sift.policy == "none" and cfg.method not in ("sift", "none"):
        p.append(f"sift.policy: none (vanilla) contradicts method: {cfg.method}; set method: none instead")
    t, s, o = cfg.train, cfg.sift, cfg.optim
    positive = {
        "train.steps": t.steps, "train.micro_batch_size": t.micro_batch_size, "train.grad_accum": t.grad_accum,
        "train.log_every": t.log_every, "train.eval_every": t.eval_every, "train.eval_batch_size": t.eval_batch_size,
        "train.keep_last": t.keep_last, "train.max_nonfinite": t.max_nonfinite, "sift.exit_layer": s.exit_layer,
    }
    p += [f"{k}: must be >= 1, got {v}" for k, v in positive.items() if v < 1]
    nonneg = {"train.save_every": t.save_every, "train.eval_samples": t.eval_samples,
              "sift.warmup_steps": s.warmup_steps, "sift.fidelity_every": s.fidelity_every,
              "sift.score_positions": s.score_positions,
              "data.num_workers": cfg.data.num_workers, "optim.grad_clip": o.grad_clip,
              "train.time_budget_s": t.time_budget_s,
              "optim.weight_decay": o.weight_decay}
    p += [f"{k}: must be >= 0, got {v}" for k, v in nonneg.items() if v < 0]
    from engine.stopping import signal_number

    p += [f"train.stop_signals: {n!r} is not a signal of this platform (e.g. SIGTERM, SIGUSR1)"
          for n in t.stop_signals if signal_number(n) is None]
    if not t.collective_timeout_s > 0:
        p.append(f"train.collective_timeout_s: must be > 0, got {t.collective_timeout_s}")
    if not 0.0 < s.keep <= 1.0:
        p.append(f"sift.keep: must be in (0, 1], got {s.keep}")
    elif cfg.selecting:
        gross = t.micro_batch_size / s.keep
        if abs(gross - s.gross_batch(t.micro_batch_size)) > 1e-6:
            p.append(
                f"sift.keep={s.keep} with train.micro_batch_size={t.micro_batch_size}: the gross batch "
                f"B / keep = {gross:g} must be a whole number"
            )
    if s.threshold_quantile is not None and not 0.0 < s.threshold_quantile < 1.0:
        p.append(f"sift.threshold_quantile: must be in (0, 1) or null, got {s.threshold_quantile}")
    elif s.policy == "stratified" and s.threshold_quantile is not None and 1.0 - s.threshold_quantile >= s.keep:
        p.append(f"sift.threshold_quantile={s.threshold_quantile} with sift.keep={s.keep}: about "
                 f"{1 - s.threshold_quantile:g} of the rows score above the threshold, which fills B; use a "
                 f"quantile above 1 - keep = {1 - s.keep:g}")
    if s.temperature <= 0:
        p.append(f"sift.temperature: must be > 0, got {s.temperature}")
    if not 0.0 < s.uniform_mix <= 1.0:
        p.append(f"sift.uniform_mix: must be in (0, 1] (every row needs a chance to be drawn), got {s.uniform_mix}")
    if s.stop_fraction is not None and not 0.0 < s.stop_fraction <= 1.0:
        p.append(f"sift.stop_fraction: must be in (0, 1] or null, got {s.stop_fraction}")
    if s.criterion == "reducible" and cfg.selecting and s.reference is None:
        p.append("sift.criterion: reducible needs sift.reference (a reference model; `sift reference` trains one)")
    if s.reference_losses is not None and s.criterion != "reducible":
        p.append(f"sift.reference_losses is only read by sift.criterion: reducible, not {s.criterion!r}")
    if cfg.data.train_half not in (None, 0, 1):
        p.append(f"data.train_half: must be 0, 1 or null, got {cfg.data.train_half}")
    if not 0.0 < cfg.data.mask_prob < 1.0:
        p.append(f"data.mask_prob: must be in (0, 1), got {cfg.data.mask_prob}")
    if o.lr <= 0:
        p.append(f"optim.lr: must be > 0, got {o.lr}")
    if o.schedule_steps is not None and o.schedule_steps < t.steps:
        p.append(f"optim.schedule_steps={o.schedule_steps} is shorter than train.steps={t.steps}: the learning rate "
                 "would be 0 for the last steps; use null (= train.steps) or a horizon >= train.steps")
    if not 0.0 <= o.warmup_fraction < 1.0:
        p.append(f"optim.warmup_fraction: must be in [0, 1), got {o.warmup_fraction}")
    if not all(0.0 <= b < 1.0 for b in o.betas):
        p.append(f"optim.betas: each must be in [0, 1), got {list(o.betas)}")
    if cfg.model.loss_chunk < 0:
        p.append(f"model.loss_chunk: must be >= 0, got {cfg.model.loss_chunk}")
    elif cfg.model.loss_chunk and cfg.model.family == "bert":
        p.append("model.loss_chunk: decoders only (BERT's MLM head already runs on the masked positions only)")
    if not 0.0 <= cfg.model.dropout < 1.0:
        p.append(f"model.dropout: must be in [0, 1), got {cfg.model.dropout}")
    p += check_vcas(cfg.vcas)
    if cfg.deepspeed.zero_stage is not None and cfg.deepspeed.zero_stage not in (0, 1, 2, 3):
        p.append(f"deepspeed.zero_stage: must be 0, 1, 2 or 3, got {cfg.deepspeed.zero_stage}")
    return p


# ----------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    """Check/convert one leaf value against its annotation; append a problem instead of raising."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            sub: list[str] = []
            out = _coerce(value, arg, where, sub)
            if not sub:
                return out
        problems.append(f"{where}: expected {_type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        (arg,) = typing.get_args(tp)
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list, got {value!r}")
            return value
        return [_coerce(v, arg, f"{where}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping, got {value!r}")
            return value
        return {_coerce(k, key_tp, f"{where} key", problems): _coerce(v, value_tp, f"{where}.{k}", problems)
                for k, v in value.items()}
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            problems.append(f"{where}: expected a list of {len(args)} values, got {value!r}")
            return value
        return tuple(_coerce(v, a, f"{where}[{i}]", problems) for i, (v, a) in enumerate(zip(value, args)))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-4" as a string
            return float(value)
        except ValueError:
            pass
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    problems.append(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return value


def _build(cls: type, data: dict[str, Any], where: str, problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(sorted(known))})"
            problems.append(f"{path}: unknown key{hint}")
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                problems.append(f"{path}: expected a mapping, got {value!r}")
                continue
            kwargs[key] = _build(tp, value, path, problems)
        else:
            before = len(problems)
            value = _coerce(value, tp, path, problems)
            if len(problems) == before:  # a value of the wrong type keeps the default, so that the
                kwargs[key] = value      # value checks below can still run on a well-typed config
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError([f"override {dotted}: {part} is not a section"])
        node = child
    node[leaf] = value


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """`a.b=value` strings -> (key, YAML-parsed value); a bad item is a ConfigError."""
    out, bad = [], []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key or " " in key:
            bad.append(f"override {item!r}: expected section.key=value")
            continue
        try:
            out.append((key.strip(), yaml.safe_load(raw) if raw.strip() else None))
        except yaml.YAMLError as e:
            bad.append(f"override {item!r}: value is not valid YAML ({e.__class__.__name__})")
    if bad:
        raise ConfigError(bad, "command line")
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """YAML file (optional) + dotted overrides -> a validated RunConfig, or one ConfigError."""
    tree: dict[str, Any] = {}
    source = "config"
    if path is not None:
        from engine.resources import resolve, shipped

        path = resolve(path, "configs")
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError([f"cannot read the config file: {e.strerror} (shipped configs: "
                               f"{', '.join(shipped('configs'))})"], source) from None
        try:
            tree = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError([f"not valid YAML: {e}"], source) from None
        if not isinstance(tree, dict):
            raise ConfigError(["the top level must be a mapping of sections"], source)
    parsed = parse_overrides(overrides or [])
    given = {key: item for (key, _), item in zip(parsed, overrides or [])}
    for key, value in parsed:
        _set_dotted(tree, key, value)
    try:
        return from_tree(tree, source)
    except ConfigError as e:
        labelled = [_label(p, given) for p in e.problems]
        if labelled == e.problems:
            raise
        raise ConfigError(labelled, f"{source} with command-line overrides") from None


def from_tree(tree: dict[str, Any], source: str = "config") -> RunConfig:
    """A config tree (YAML's, or ``to_dict``'s as a checkpoint records it) -> a validated RunConfig, or one
    ConfigError."""
    problems: list[str] = []
    cfg = _build(RunConfig, tree, "", problems)
    # Value checks run even after key/type errors: one message lists every problem. A key whose type
    # was wrong holds its default now, so a value check that names it would only mislead.
    mistyped = {p.split(":", 1)[0] for p in problems if ": unknown key" not in p}
    problems += [p for p in validate(cfg) if not any(key in p for key in mistyped)]
    if problems:
        raise ConfigError(problems, source)
    return cfg


def _label(problem: str, given: dict[str, str]) -> str:
    """A problem with a key the command line set names that override, so that nobody looks for it in the
    YAML file."""
    key = problem.split(":", 1)[0]
    item = next((item for k, item in given.items() if key == k or key.startswith((f"{k}.", f"{k}["))), None)
    return f"command-line override {item!r}: {problem}" if item else problem


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML/JSON-serialisable dict of a config (tuples become lists)."""
    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v

    return plain(cfg)
