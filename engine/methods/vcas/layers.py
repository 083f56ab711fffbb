"""Where VCAS samples: a row sampler after every block and a sampled Linear inside each block.

Both are autograd Functions whose forward is the plain one; what their backward does is decided by the
``Pass`` object the current forward ran under (``Shared.plan``): the training pass of a micro-step, a
calibration pass, or none (exact, plain autograd: eval, scoring, ratios of 1).

Backward, block by block from the top (blocks never mix rows):

- ``RowSampler`` at block l's output: scores each row by the L2 norm of its output gradient, keeps it
  with probability p_i = min(1, c x_i), sum p = rho_l N (``ops.keep_probabilities``), scales kept rows by
  1 / p_i and zeroes the rest; rows dropped here stay zero below. It records the kept rows for block l's
  Linears (``Pass.rows``). With rho non-decreasing in depth, a block whose ratio equals the one above
  keeps the rows it was handed instead of drawing again.
- ``SampledLinear``: the input gradient only for the kept rows; the weight gradient from the tokens of
  those rows drawn with probability q_t proportional to |dZ_t| |X_t| (leverage scores), sum q = nu K,
  each scaled by 1 / q_t; the bias gradient exactly. In the last block, Linears whose output gradient
  lives only where the block's output gradient does (``BlockLinear.token_local``) run only on the
  positions the loss reads (``SiftModel.live_positions``): exact.

A block's projections are ``nn.Linear`` (weight (out, in)) or transformers' ``Conv1D`` (GPT-2: weight
stored transposed, (in, out)); both go through the same backward, which reads ``Site.transposed``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from engine.methods.vcas import ops
from engine.models.base import BlockLinear, SiftModel


@dataclass(slots=True)
class Site:
    """One sampled Linear: its place and what it costs."""

    index: int
    """Position in the list of all sampled Linears (block-major)."""
    block: int
    role: str
    """Its path inside the block (``BlockLinear.path``)."""
    token_local: bool
    in_features: int
    out_features: int
    transposed: bool = False
    """Its weight is stored (in, out) (transformers' ``Conv1D``), not (out, in) as in ``nn.Linear``."""


@dataclass(slots=True)
class Recorder:
    """What a calibration pass collects, per Linear: sampled entries of its (activation-sampled, never
    weight-sampled) weight gradient and, for sampled passes, the analytic weight-sampling variance at
    its current nu; per block: the rows' output-gradient norms (exact passes)."""

    entries: list[torch.Tensor]
    """Per Linear: flat indices of the weight entries the variances are estimated on."""
    exact: bool
    """An exact pass (row norms recorded) or an activation-sampled one."""
    nu_down: list[float] = field(default_factory=list)
    """Per Linear: the lower candidate weight ratio the controller may move to."""
    w_var_at_exact: bool = False
    """Also the weight-sampling variances in the exact pass (when no row is sampled, the sampled passes
    would repeat it)."""
    grads: dict[int, torch.Tensor] = field(default_factory=dict)
    w_var: dict[int, torch.Tensor] = field(default_factory=dict)
    """Per Linear: (2,) the weight-sampling variance at nu and at nu_down."""
    norms: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass(slots=True)
class Pass:
    """How one forward/backward samples, and what its backward found on the way down."""

    rho: list[float]
    """Per block: share of rows kept (non-decreasing with depth)."""
    nu: list[float]
    """Per Linear: share of tokens the weight gradient is sampled from."""
    key: int
    """Stateless randomness: block l draws from ``mix(key, l)``, Linear i from ``mix(key, 1000 + i)``."""
    live: tuple[torch.Tensor, torch.Tensor] | None = None
    """Last block: the (N, P') positions the loss reads, sorted per row, and (N, P') False where a
    position repeats; None: all positions."""
    recorder: Recorder | None = None
    """Calibration: record instead of sampling weight gradients (see ``Recorder``)."""
    rows: dict[int, torch.Tensor | None] = field(default_factory=dict)
    """Block -> its kept rows (None: all); written by its RowSampler, read by its Linears."""
    block_input: torch.Tensor | None = None
    """The first block's input (calibration differentiates down to it)."""

    def draws_rows(self, block: int) -> bool:
        r = self.rho[block]
        return r < 1.0 and (block == len(self.rho) - 1 or r < self.rho[block + 1])

    def needs_sampler(self, block: int) -> bool:
        return self.recorder is not None or self.rho[block] < 1.0

    def needs_custom(self, site: Site, last_block: int) -> bool:
        """False: plain autograd computes this Linear's backward exactly as the sampled path would."""
        return (self.recorder is not None or self.rho[site.block] < 1.0 or self.nu[site.index] < 1.0
                or (self.live is not None and site.block == last_block and site.token_local))


class Shared:
    """The current pass, shared by the hooks and Linears of one model (the method sets it)."""

    def __init__(self, num_blocks: int, device: torch.device | None = None):
        self.plan: Pass | None = None
        self.num_blocks = num_blocks
        self.device = device
        self.weight_ready: Any = None
        """Context manager factory making a partitioned (ZeRO-3) weight whole in the backward, or None."""


# ----------------------------------------------------------------------------- row sampling


class RowSampler(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, plan: Pass, block: int) -> torch.Tensor:
        ctx.plan, ctx.block = plan, block
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        """(N, ...) output gradient -> the same, rows dropped (zero) or scaled by 1 / p."""
        plan, block = ctx.plan, ctx.block
        if plan.recorder is not None and plan.recorder.exact:
            plan.recorder.norms[block] = grad.detach().flatten(1).float().norm(dim=1)
        if not plan.draws_rows(block):
            plan.rows[block] = plan.rows.get(block + 1)
            return grad, None, None
        N = grad.shape[0]
        norms = grad.detach().flatten(1).float().norm(dim=1)  # (N,)
        p = ops.keep_probabilities(norms, ops.count_for(plan.rho[block], N))
        keep = ops.bernoulli(p, ops.generator(ops.mix(plan.key, block), grad.device))
        rows = keep.nonzero().squeeze(1)  # a host sync: the kept count decides the shapes below
        plan.rows[block] = rows
        out = torch.zeros_like(grad)
        scale = (1.0 / p.index_select(0, rows)).view(-1, *([1] * (grad.dim() - 1)))
        out.index_copy_(0, rows, (grad.index_select(0, rows).float() * scale).to(grad.dtype))
        return out, None, None


# ----------------------------------------------------------------------------- the sampled Linear


def _token_index(rows: torch.Tensor | None, N: int, T: int, live: tuple[torch.Tensor, torch.Tensor] | None,
                 device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Flat (N * T) indices of the tokens whose output gradient may be non-zero, and their 0/1 weights (0
    for a repeated position; None: no repeats); (None, None) for all tokens."""
    if live is None:
        if rows is None:
            return None, None
        return (rows[:, None] * T + torch.arange(T, device=device)).flatten(), None
    pos, first = live  # (N, P') each
    r = torch.arange(N, device=device) if rows is None else rows
    return (r[:, None] * T + pos.index_select(0, r)).flatten(), first.index_select(0, r).flatten()


def affine(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    """The projection's own forward: ``F.linear``, or ``Conv1D``'s addmm on the (in, out) weight."""
    if not transposed:
        return F.linear(x, weight, bias)
    return torch.addmm(bias, x.view(-1, x.shape[-1]), weight).view(*x.shape[:-1], weight.shape[1])


class SampledLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, plan: Pass,
                site: Site, shared: Shared) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.plan, ctx.site, ctx.shared, ctx.has_bias = plan, site, shared, bias is not None
        return affine(x, weight, bias, site.transposed)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        x, weight = ctx.saved_tensors
        plan, site, shared = ctx.plan, ctx.site, ctx.shared
        if shared.weight_ready is None:
            return *_linear_backward(x, weight, grad, plan, site, ctx.has_bias), None, None, None
        with shared.weight_ready(weight):  # ZeRO-3: whole for the duration, as DeepSpeed's own linear does
            return *_linear_backward(x, weight, grad, plan, site, ctx.has_bias), None, None, None


def _linear_backward(x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, plan: Pass, site: Site,
                     has_bias: bool) -> tuple[Any, ...]:
    """x (N, T, in), grad (N, T, out) -> grad_input, grad_weight (the weight's layout), grad_bias (see the
    module docstring)."""
    N, T = x.shape[0], x.numel() // (x.shape[0] * x.shape[-1])
    w_in = weight.t() if site.transposed else weight  # (out, in): maps an output gradient to the input's
    x2, g2 = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
    last = site.block == len(plan.rho) - 1
    live = plan.live if (last and site.token_local) else None
    idx, w = _token_index(plan.rows.get(site.block), N, T, live, x.device)
    if idx is None:
        gs, xs = g2, x2
        grad_input = g2.mm(w_in).view(x.shape)
    else:
        gs, xs = g2.index_select(0, idx), x2.index_select(0, idx)
        if w is not None:
            gs = gs * w[:, None].to(gs.dtype)  # a repeated position counts once
        grad_input = torch.zeros_like(x2).index_add_(0, idx, gs.mm(w_in)).view(x.shape)
    grad_bias = gs.sum(0) if has_bias else None
    rec = plan.recorder
    if rec is not None:
        full = _outer(gs, xs, site.transposed)
        rec.grads[site.index] = full.flatten().index_select(0, rec.entries[site.index]).float()
        if not rec.exact or rec.w_var_at_exact:
            rec.w_var[site.index] = torch.stack([_weight_sampling_variance(gs, xs, plan.nu[site.index]),
                                                 _weight_sampling_variance(gs, xs, rec.nu_down[site.index])])
        return grad_input, None, None
    nu = plan.nu[site.index]
    K = gs.shape[0]
    if nu >= 1.0 or K == 0:
        grad_weight = _outer(gs, xs, site.transposed)
    else:
        a, b = gs.float().norm(dim=1), xs.float().norm(dim=1)
        q = ops.keep_probabilities(a * b, ops.count_for(nu, K))
        keep = ops.bernoulli(q, ops.generator(ops.mix(plan.key, 1000 + site.index), x.device))
        kept = keep.nonzero().squeeze(1)  # a host sync, as for the rows
        scaled = (gs.index_select(0, kept).float() / q.index_select(0, kept)[:, None]).to(gs.dtype)
        grad_weight = _outer(scaled, xs.index_select(0, kept), site.transposed)
    return grad_input, grad_weight, grad_bias


def _outer(g: torch.Tensor, a: torch.Tensor, transposed: bool) -> torch.Tensor:
    """(K, out) output gradients and (K, in) inputs -> sum over the K tokens of g_t a_t^T, in the weight's
    stored layout: (out, in), or (in, out) when ``transposed``."""
    return a.t().mm(g) if transposed else g.t().mm(a)


def _weight_sampling_variance(gs: torch.Tensor, xs: torch.Tensor, nu: float) -> torch.Tensor:
    """The variance leverage sampling at ``nu`` would add to gs^T xs (``ops.leverage_variance``)."""
    if nu >= 1.0 or gs.shape[0] == 0:
        return torch.zeros((), device=gs.device, dtype=torch.float64)
    a_sq, b_sq = gs.float().square().sum(1), xs.float().square().sum(1)
    q = ops.keep_probabilities((a_sq * b_sq).sqrt(), ops.count_for(nu, gs.shape[0]))
    return ops.leverage_variance(a_sq, b_sq, q).double()


class VcasLinear(nn.Linear):
    """An ``nn.Linear`` holding the original's parameters (same names, same tensors) whose backward
    samples while a pass asks for it; otherwise exactly ``F.linear``."""

    def __init__(self, linear: nn.Linear, site: Site, shared: Shared):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.site, self._shared = site, shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _forward(self, x, self._shared)


class VcasConv1D(Conv1D):
    """The same for transformers' ``Conv1D`` (GPT-2's projections, weight (in, out)); like ``VcasLinear``,
    it stays an instance of the class it replaces."""

    def __init__(self, conv: Conv1D, site: Site, shared: Shared):
        nn.Module.__init__(self)
        self.nf, self.nx = conv.nf, conv.nx
        self.weight, self.bias = conv.weight, conv.bias
        self.site, self._shared = site, shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _forward(self, x, self._shared)


def _forward(module: VcasLinear | VcasConv1D, x: torch.Tensor, shared: Shared) -> torch.Tensor:
    plan, site = shared.plan, module.site
    if plan is None or not torch.is_grad_enabled() or not plan.needs_custom(site, shared.num_blocks - 1):
        return affine(x, module.weight, module.bias, site.transposed)
    return SampledLinear.apply(x, module.weight, module.bias, plan, site, shared)


PROJECTIONS = (nn.Linear, Conv1D)
"""The module types a family's ``block_linears`` may name."""


# ----------------------------------------------------------------------------- installing


def install(model: SiftModel, shared: Shared) -> list[Site]:
    """Swap each block's declared Linears for ``VcasLinear`` (a ``Conv1D`` for ``VcasConv1D``; parameter
    names unchanged) and hook every block's output; returns the sampled Linears, block-major. Before
    ``deepspeed.initialize``."""
    linears: tuple[BlockLinear, ...] = type(model).block_linears
    sites: list[Site] = []
    for b, block in enumerate(model.blocks()):
        for spec in linears:
            parent_path, _, attr = spec.path.rpartition(".")
            parent = block.get_submodule(parent_path) if parent_path else block
            old = getattr(parent, attr)
            if isinstance(old, Conv1D):
                site = Site(len(sites), b, spec.path, spec.token_local, old.nx, old.nf, transposed=True)
                setattr(parent, attr, VcasConv1D(old, site, shared))
            else:
                site = Site(len(sites), b, spec.path, spec.token_local, old.in_features, old.out_features)
                setattr(parent, attr, VcasLinear(old, site, shared))
            sites.append(site)
        block.register_forward_hook(_output_hook(shared, b))
        if b == 0:
            block.register_forward_pre_hook(_input_hook(shared), with_kwargs=True)
    return sites


def _output_hook(shared: Shared, b: int) -> Any:
    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        plan = shared.plan
        if plan is None or not torch.is_grad_enabled() or not plan.needs_sampler(b):
            return None
        if isinstance(output, tuple):  # older transformers return (hidden, ...)
            return (RowSampler.apply(output[0], plan, b), *output[1:])
        return RowSampler.apply(output, plan, b)
    return hook


def _input_hook(shared: Shared) -> Any:
    def hook(module: nn.Module, args: Any, kwargs: Any) -> None:
        plan = shared.plan
        if plan is not None and plan.recorder is not None and torch.is_grad_enabled():
            plan.block_input = next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
    return hook
