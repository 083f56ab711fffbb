"""VCAS (arXiv 2402.17227): every row in the forward, sampling inside the backward, variance-controlled.

``method: vcas`` alone, or ``method: sift+vcas`` (SIFT keeps B of G rows; VCAS samples inside their
backward). The sampling lives in the model's blocks (``layers.py``: a row sampler after every block, the
block's Linears swapped for sampled ones before DeepSpeed wraps the model, parameter names unchanged);
the ratios come from a controller (``controller.py``) that every F optimizer steps measures variances
on the last M micro-batches trained on, or are fixed (``vcas.adaptive: false``). docs/vcas.md has the
method, its knobs and where it departs from the reference code.

What a model family must provide: ``SiftModel.block_linears`` (the Linears inside each block, and which
of them are position-wise) and, for the exact last-block saving, ``SiftModel.live_positions``.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from engine.methods.base import Method, MicroContext, RunContext, TrainShape
from engine.methods.vcas import ops
from engine.methods.vcas.controller import Estimates, Ratios, Tally, down_nu, update
from engine.methods.vcas.flops import VcasFlops
from engine.methods.vcas.layers import PROJECTIONS, Pass, Recorder, Shared, Site, install
from engine.models.base import Batch, SiftModel

if TYPE_CHECKING:
    from engine.config import RunConfig
    from engine.methods.vcas.config import VcasConfig

log = logging.getLogger(__name__)

# Tags that keep the stateless streams apart.
_TRAIN, _CALIB, _DROPOUT, _ENTRIES = 1, 2, 3, 4
MIN_ENTRIES = 1024


class Vcas(Method):
    name = "vcas"
    selects = False

    def __init__(self, cfg: RunConfig):
        self._setup(cfg.vcas, TrainShape.of(cfg))

    @classmethod
    def from_settings(cls, settings: VcasConfig, shape: TrainShape) -> Vcas:
        """Built from its own settings and the run's shape alone (no ``RunConfig``)."""
        method = cls.__new__(cls)
        method._setup(settings, shape)
        return method

    def _setup(self, settings: VcasConfig, shape: TrainShape) -> None:
        self.cfg, self.seed, self.compile = settings, shape.seed, shape.compile
        self.grad_accum = shape.grad_accum
        self.shared: Shared | None = None
        self.sites: list[Site] = []
        self.ratios: Ratios | None = None
        self.recent: deque[Batch] = deque(maxlen=self.cfg.calib_batches)
        self.calibrations = 0
        self.model: SiftModel | None = None
        self.run: RunContext | None = None
        self.flops: VcasFlops | None = None
        self._stats: dict[str, Any] = {}

    # ------------------------------------------------------------------ set-up

    def check(self, model: SiftModel) -> list[str]:
        problems = []
        if self.compile:
            problems.append("train.compile: not supported with method vcas (its backward keeps a data-dependent "
                            "number of rows and tokens); set train.compile=false")
        linears = type(model).block_linears
        if not linears:
            problems.append(f"method vcas: model family {model.family!r} declares no block Linears "
                            "(SiftModel.block_linears), so VCAS cannot sample inside its blocks")
        for spec in linears:
            try:
                found = model.blocks()[0].get_submodule(spec.path)
            except AttributeError:
                found = None
            if not isinstance(found, PROJECTIONS):
                problems.append(f"method vcas: {model.family} block_linears names {spec.path!r}, which is not an "
                                "nn.Linear (or transformers Conv1D) inside the first block")
        return problems

    def prepare_model(self, model: SiftModel) -> None:
        self.model = model
        self.shared = Shared(model.num_layers)
        self.sites = install(model, self.shared)
        L, n = model.num_layers, len(self.sites)
        c = self.cfg
        self.ratios = Ratios.exact(L, n) if c.adaptive else Ratios(1.0, [c.rho] * L, [c.nu] * n)

    def attach(self, run: RunContext) -> None:
        self.run = run
        self.shared.device = run.device
        if run.zero_stage == 3:
            from engine import ds  # only under ZeRO-3, which means deepspeed is there

            self.shared.weight_ready = ds.whole

    # ------------------------------------------------------------------ training passes

    def _live(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The positions the loss reads, sorted per row, and weights that count a repeated one once."""
        if not self.cfg.live_positions:
            return None
        pos = self.model.live_positions(batch)
        if pos is None:
            return None
        pos = torch.sort(pos, dim=1).values
        first = torch.ones_like(pos, dtype=torch.bool)
        first[:, 1:] = pos[:, 1:] != pos[:, :-1]
        return pos, first

    def _training_pass(self, batch: Batch, ctx: MicroContext) -> Pass | None:
        r, live = self.ratios, self._live(batch)
        if live is None and min(r.rho) >= 1.0 and min(r.nu) >= 1.0:
            return None  # exact: plain autograd, bitwise
        return Pass(list(r.rho), list(r.nu), key=ops.base_key(self.seed, ctx.draw, ctx.rank, _TRAIN), live=live)

    def before_forward(self, batch: Batch, ctx: MicroContext) -> None:
        self.recent.append(batch)
        self.shared.plan = self._training_pass(batch, ctx)
        if self.flops is None:
            live = self._live(batch)
            self.flops = VcasFlops(self.model.flops(batch["input_ids"].shape[1]), batch["input_ids"].shape[1],
                                   tuple(self.sites), None if live is None else live[0].shape[1])
        r = self.ratios
        self._stats |= {"vcas_s": r.s, "vcas_rho": sum(r.rho) / len(r.rho), "vcas_nu": sum(r.nu) / len(r.nu),
                        "vcas_flops": self.flops.ratio(r.rho, r.nu)}

    def after_backward(self, ctx: MicroContext) -> None:
        self.shared.plan = None

    def after_step(self, ctx: MicroContext) -> None:
        self.shared.plan = None
        due = self.cfg.adaptive and (ctx.step + 1) % self.cfg.calib_every == 0
        if due and len(self.recent) == self.cfg.calib_batches:
            self.calibrate(ctx.step, ctx.rank)

    # ------------------------------------------------------------------ calibration

    def _entries(self, device: torch.device) -> tuple[list[torch.Tensor], list[float]]:
        """Per Linear: which weight entries this calibration compares (the same on every rank), and
        numel / their count."""
        key = ops.base_key(self.seed, self.calibrations, _ENTRIES)
        entries, scale = [], []
        for s in self.sites:
            numel = s.in_features * s.out_features
            n = min(numel, max(MIN_ENTRIES, round(self.cfg.var_fraction * numel)))
            gen = ops.generator(ops.mix(key, s.index), device)
            entries.append(torch.arange(numel, device=device) if n == numel
                           else torch.randint(numel, (n,), generator=gen, device=device))
            scale.append(numel / n)
        return entries, scale

    def _grad_pass(self, batch: Batch, plan: Pass) -> None:
        """Forward and backward down to the first block's input, recording into ``plan.recorder``; never
        touches ``.grad`` or DeepSpeed's engine (no reduction, no counters)."""
        self.shared.plan = plan
        try:
            with torch.enable_grad():
                out = self.model(**batch)
                torch.autograd.grad(out["loss"], [plan.block_input])
        finally:
            self.shared.plan = None

    def calibrate(self, step: int, rank: int) -> None:
        """Estimate the variances on the last M micro-batches and update the ratios (identically on every
        rank). The run's RNG streams are restored afterwards; its data order is untouched."""
        r, M, L = self.ratios, self.cfg.calib_batches, len(self.ratios.rho)
        device = self.run.device
        entries, scale = self._entries(device)
        tally = Tally(scale, L, *r.candidates(self.cfg.alpha))
        sampled = min(r.rho) < 1.0  # else the sampled passes would repeat the exact one
        nu_down = [down_nu(n, self.cfg) for n in r.nu]
        cuda = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            for b, batch in enumerate(self.recent):
                live = self._live(batch)
                dropout = ops.base_key(self.seed, self.calibrations, rank, b, _DROPOUT)
                torch.manual_seed(dropout)  # every pass on this batch sees the same dropout masks
                exact = Pass([1.0] * L, list(r.nu), key=0, live=live,
                             recorder=Recorder(entries, exact=True, nu_down=nu_down, w_var_at_exact=not sampled))
                self._grad_pass(batch, exact)
                tally.add_exact(exact.recorder.grads, exact.recorder.norms, exact.recorder.w_var)
                for j in range(M if sampled else 0):
                    torch.manual_seed(dropout)
                    key = ops.base_key(self.seed, self.calibrations, rank, b, j, _CALIB)  # independent draws
                    plan = Pass(list(r.rho), list(r.nu), key=key, live=live, recorder=Recorder(entries, exact=False, nu_down=nu_down))
                    self._grad_pass(batch, plan)
                    tally.add_sampled(plan.recorder.grads, plan.recorder.w_var)
        est = self._average_over_ranks(tally.estimates())
        self.calibrations += 1
        if not all(math.isfinite(x) for x in est.vector()):  # a non-finite batch: the same on every rank
            log.warning("VCAS calibration after step %d: non-finite statistics; ratios kept", step + 1)
            self._stats["vcas_calib_skipped"] = 1.0
            return
        self.ratios = update(r, est, self.cfg)
        sgd = max(sum(est.sgd), 1e-30)
        self._stats |= {"vcas_var_sgd": sum(est.sgd), "vcas_var_act": sum(est.act) / sgd,
                        "vcas_var_w": sum(est.w) / sgd,
                        "vcas_flops_calib": self.flops.ratio(r.rho, r.nu, batches=M, every=self.cfg.calib_every,
                                                             grad_accum=self.grad_accum)}

    def _average_over_ranks(self, est: Estimates) -> Estimates:
        v = torch.tensor(est.vector(), dtype=torch.float64, device=self.run.device)
        if self.run.world_size > 1:
            dist.all_reduce(v, group=self.run.group)
            v /= self.run.world_size
        return Estimates.from_vector(v.tolist(), len(self.sites), len(self.ratios.rho))

    # ------------------------------------------------------------------ reporting and state

    def stats(self) -> dict[str, Any]:
        out, self._stats = self._stats, {}
        return out

    def state_dict(self) -> dict[str, Any]:
        r = self.ratios
        return {"s": r.s, "rho": list(r.rho), "nu": list(r.nu), "calibrations": self.calibrations,
                "recent": [{k: v.cpu() for k, v in b.items()} for b in self.recent]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        L, n = len(self.ratios.rho), len(self.ratios.nu)
        if len(state["rho"]) != L or len(state["nu"]) != n:
            raise ValueError(f"vcas state has {len(state['rho'])} block and {len(state['nu'])} Linear ratios, the "
                             f"model {L} blocks and {n} sampled Linears")
        if self.cfg.adaptive:  # fixed ratios come from the config, also on resume
            self.ratios = Ratios(float(state["s"]), [float(x) for x in state["rho"]], [float(x) for x in state["nu"]])
        self.calibrations = int(state["calibrations"])
        device = self.run.device if self.run is not None else torch.device("cpu")
        self.recent.clear()
        self.recent.extend({k: v.to(device) for k, v in b.items()} for b in state["recent"])

