"""``SiftArguments``: the ``method``, ``sift.*`` and ``vcas.*`` settings of a run config, for the Hugging Face
Trainer and accelerate loops. Same keys, same types, same checks (engine/config.py), every problem at once."""

from __future__ import annotations

from typing import Any

from engine.config import ConfigError, RunConfig, TrainConfig, _build, validate
from engine.methods import METHODS, Method, MethodStack, TrainShape, method_names
from engine.methods.sift_config import SiftConfig
from engine.methods.vcas.config import VcasConfig
from engine.scoring import REFERENCED

SOURCE = "SiftArguments"
UNWEIGHTED = ("topk", "random", "none")
"""The policies whose kept rows all count once in the loss (the weighted ones, engine/selection.py, need
a loss that applies per-row weights)."""


class SiftArguments:
    """``SiftArguments(method="sift", keep=0.5, criterion="loss", exit_layer=1, warmup_steps=0, ...,
    vcas={"adaptive": False, "rho": 0.5})``: the keyword arguments are the run config's ``sift.*`` keys,
    ``vcas`` a mapping of its ``vcas.*`` keys; ``method`` is ``sift``, ``vcas``, ``sift+vcas`` or ``none``.

    Raises ``ConfigError`` listing every problem. Inside a Trainer the scoring is serial (the weights at
    the start of each accumulation window), so ``schedule`` must stay ``serial``.
    """

    def __init__(self, method: str = "sift", *, vcas: dict[str, Any] | None = None, **sift: Any):
        problems: list[str] = []
        self.method = method
        self.sift: SiftConfig = _build(SiftConfig, sift, "sift", problems)
        self.vcas: VcasConfig = _build(VcasConfig, dict(vcas or {}), "vcas", problems)
        problems += self._check(micro_batch_size=None)
        if problems:
            raise ConfigError(problems, SOURCE)

    def __getattr__(self, name: str) -> Any:  # args.keep, args.criterion, ...
        if name in ("sift", "vcas", "method"):  # not yet set (inside __init__)
            raise AttributeError(name)
        return getattr(self.sift, name)

    def __repr__(self) -> str:
        return f"SiftArguments(method={self.method!r}, sift={self.sift!r}, vcas={self.vcas!r})"

    def _check(self, micro_batch_size: int | None) -> list[str]:
        """The run config's checks of these sections (with B when known: B / keep must be whole)."""
        train = TrainConfig(micro_batch_size=micro_batch_size or 1)
        cfg = RunConfig(method=self.method, sift=self.sift, vcas=self.vcas, train=train)
        problems = [p for p in validate(cfg) if p.startswith(("method", "sift.", "vcas."))]
        if micro_batch_size is None:  # B unknown yet: the whole-gross-batch check waits for it
            problems = [p for p in problems if "gross batch" not in p]
        if self.sift.policy not in UNWEIGHTED:
            problems.append(f"sift.policy: {self.sift.policy!r} is not available inside a Trainer or an accelerate "
                            "loop (a weighted policy needs per-row loss weights the stock model's loss cannot "
                            f"apply); use one of {', '.join(UNWEIGHTED)}")
        if self.sift.criterion in REFERENCED:
            problems.append(f"sift.criterion: {self.sift.criterion!r} is not available inside a Trainer or an "
                            "accelerate loop (its reference model reads the project's prepared data)")
        if self.sift.schedule != "serial":
            problems.append(f"sift.schedule: {self.sift.schedule!r} is not available inside a Trainer or an "
                            "accelerate loop (no side stream there); use 'serial'")
        return problems

    @property
    def names(self) -> list[str]:
        """The methods, e.g. ``["sift", "vcas"]``; ``[]`` for vanilla."""
        return method_names("none" if self.sift.policy == "none" else self.method)

    @property
    def selecting(self) -> bool:
        return any(METHODS[n].selects for n in self.names)

    def gross_batch_size(self, micro_batch_size: int) -> int:
        """G = B / keep when a method selects rows; B otherwise."""
        return round(micro_batch_size / self.sift.keep) if self.selecting else micro_batch_size

    def build(self, shape: TrainShape) -> MethodStack:
        """The methods for a run of this shape; ConfigError when B / keep is not whole."""
        problems = self._check(shape.micro_batch_size)
        if problems:
            raise ConfigError(problems, SOURCE)
        settings = {"sift": self.sift, "vcas": self.vcas}
        methods: list[Method] = []
        for name in self.names:
            cls = METHODS[name]
            if not hasattr(cls, "from_settings"):
                raise ConfigError([f"method {name!r} cannot be built from its settings alone (no from_settings)"],
                                  SOURCE)
            methods.append(cls.from_settings(settings.get(name, self.sift), shape))
        return MethodStack(methods, shape.micro_batch_size)
