"""VCAS on a tiny BERT (engine/methods/vcas): exact at ratio 1, unbiased when sampling, the controller's
direction, calibration that leaves the run alone, state for exact resumption."""

from __future__ import annotations

import pytest
import torch

from engine.config import ConfigError, load_config
from engine.methods import MicroContext
from engine.methods.vcas import Vcas
from engine.methods.vcas.controller import Estimates, Ratios, Tally, monotone, update
from engine.methods.vcas.layers import Pass, Recorder, SampledLinear, Shared, Site, VcasConv1D, VcasLinear
from engine.schedule import SerialSchedule
from engine.setup import prepare_methods
from tests.helpers import (
    PlainEngine,
    batch_stream,
    clm_batch,
    methods_for,
    random_batch,
    schedule_for,
    tiny_decoder,
    tiny_model,
)

B = 8


def vcas_for(model, *overrides: str, method: str = "vcas") -> Vcas:
    stack = methods_for(model, PlainEngine(model), B=B, method=method, overrides=overrides)
    return next(m for m in stack.methods if m.name == "vcas")


def ctx(draw: int, step: int = 0) -> MicroContext:
    return MicroContext(draw=draw, step=step, rank=0, world_size=1, grad_accum=1)


def grads(model, batch, vcas: Vcas | None = None, draw: int = 0) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    if vcas is not None:
        vcas.before_forward(batch, ctx(draw))
    model(**batch)["loss"].backward()
    if vcas is not None:
        vcas.after_backward(ctx(draw))
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_parameter_names_survive_the_swap():
    plain, swapped = tiny_model(seed=1), tiny_model(seed=1)
    vcas_for(swapped)
    assert list(dict(plain.named_parameters())) == list(dict(swapped.named_parameters()))
    assert sum(isinstance(m, VcasLinear) for m in swapped.modules()) == 6 * swapped.num_layers


def test_ratio_one_is_bitwise_plain_autograd(monkeypatch):
    """Fixed rho = nu = 1: the same gradients bit for bit, both when VCAS steps aside (its default at ratio
    1) and when its own backward runs every Linear and row sampler (forced)."""
    batch = random_batch(G=B, seed=5)
    want = grads(tiny_model(seed=2, dropout=0.0), batch)
    model = tiny_model(seed=2, dropout=0.0)
    vcas = vcas_for(model, "vcas.adaptive=false", "vcas.live_positions=false")
    got = grads(model, batch, vcas)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    monkeypatch.setattr(Pass, "needs_custom", lambda self, site, last: True)
    monkeypatch.setattr(Pass, "needs_sampler", lambda self, block: True)
    monkeypatch.setattr(Vcas, "_training_pass", lambda self, b, c: Pass([1.0] * 3, [1.0] * 18, key=1))
    forced = grads(model, batch, vcas)
    assert all(torch.equal(forced[k], want[k]) for k in want), [k for k in want if not torch.equal(forced[k], want[k])]


def test_the_last_block_saving_is_exact():
    """Position-wise Linears of the last block back-propagate only at masked positions and [CLS]."""
    batch = random_batch(G=B, seed=6)
    model = tiny_model(seed=2, dropout=0.0).double()
    want = grads(model, batch)
    vcas = vcas_for(model, "vcas.adaptive=false")
    got = grads(model, batch, vcas)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-12, atol=1e-14, msg=k)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_sampled_gradients_are_unbiased(family):
    """fp64, dropout 0, rho = nu = 0.5: the mean of R sampled gradients is within a few standard errors of
    the exact gradient, entry by entry, for every parameter; parameters above the sampled blocks (the
    heads) are exact in every draw. The same check rejects a 10% bias in most parameters. GPT-2's
    projections are transformers Conv1Ds (weights stored transposed)."""
    if family == "bert":
        batch, model, head = random_batch(G=B, seed=7), tiny_model(seed=4, dropout=0.0), "hf.cls.seq_relationship.weight"
    else:
        batch, model, head = clm_batch(G=B, seed=7), tiny_decoder("gpt2", seed=4, dropout=0.0), "hf.transformer.ln_f.weight"
    model = model.double()
    exact = grads(model, batch)
    vcas = vcas_for(model, "vcas.adaptive=false", "vcas.rho=0.5", "vcas.nu=0.5")
    R = 300
    draws = [grads(model, batch, vcas, draw=r) for r in range(R)]
    tol = 1e-9 * max(float(w.abs().max()) for w in exact.values())  # rounding level (key biases: exactly 0)
    sampled = detected = 0
    for name, want in exact.items():
        g = torch.stack([d[name] for d in draws])
        mean, se = g.mean(0), g.std(0) / R ** 0.5
        if torch.all(se == 0):
            torch.testing.assert_close(mean, want, rtol=1e-10, atol=1e-13, msg=name)
            continue
        sampled += 1
        se = (se.square() + tol ** 2).sqrt()
        z = (mean - want) / se
        assert z.abs().max() < 6 and z.square().mean() < 2, (name, float(z.abs().max()), float(z.square().mean()))
        zb = (0.9 * mean - want) / se
        detected += bool(zb.abs().max() >= 6 or zb.square().mean() >= 2)
    assert sampled >= len(type(model).block_linears) * model.num_layers * 2  # every weight and bias had noise
    assert detected > 0.75 * sampled
    assert all(torch.equal(d[head], exact[head]) for d in draws)


def test_dropped_rows_stay_zero_below_and_kept_rows_are_scaled():
    """The row sampler's own output: kept rows scaled by 1/p >= 1, the rest exactly zero."""
    model = tiny_model(seed=2, dropout=0.0).double()
    vcas = vcas_for(model, "vcas.adaptive=false", "vcas.rho=0.5", "vcas.live_positions=false")
    batch = random_batch(G=B, seed=8)
    seen = {}
    for b, block in enumerate(model.blocks()):
        block.register_full_backward_hook(lambda m, gi, go, b=b: seen.__setitem__(b, gi[0]))
    vcas.before_forward(batch, ctx(3))
    plan = vcas.shared.plan
    model(**batch)["loss"].backward()
    kept = plan.rows[0]
    assert 0 < kept.numel() <= B and plan.rows[1] is plan.rows[0] is plan.rows[2]  # one draw: rho is uniform
    dropped = torch.ones(B, dtype=torch.bool)
    dropped[kept] = False
    assert torch.all(seen[0][dropped] == 0) and torch.all(seen[0][~dropped].flatten(1).norm(dim=1) > 0)


# ----------------------------------------------------------------------------- the controller


def estimates(act: float, w: float, w_down: float, n: int = 2, L: int = 2) -> Estimates:
    return Estimates(sgd=[1.0] * n, act=[act / n] * n, w=[w] * n, w_down=[w_down] * n,
                     frac_up=[0.9, 0.8][:L], frac_down=[0.6, 0.5][:L])


def test_controller_moves_s_and_takes_rho_from_the_updated_s():
    cfg = load_config(None, ["vcas.alpha=0.1", "vcas.rho_decay=0", "vcas.beta=0.5", "vcas.nu_min=0.2"]).vcas
    r = Ratios(0.7, [0.7, 0.7], [0.5, 0.5])
    up = update(r, estimates(act=0.5, w=1.0, w_down=1.0), cfg)  # too much variance: s and nu go up
    assert up.s == pytest.approx(0.8) and up.rho == [0.9, 0.9] and up.nu == [1.0, 1.0]
    down = update(r, estimates(act=0.0, w=0.0, w_down=0.0), cfg)
    assert down.s == pytest.approx(0.6) and down.rho == [0.6, 0.6] and down.nu == [0.25, 0.25]
    hold = update(r, estimates(act=0.0, w=0.01, w_down=0.5), cfg)  # fine now, too noisy one step down
    assert hold.nu == [0.5, 0.5]
    floor = update(Ratios(0.7, [0.7, 0.7], [0.3, 0.3]), estimates(act=0.0, w=0.0, w_down=0.0), cfg)
    assert floor.nu == [0.2, 0.2]
    assert monotone([0.9, 0.4, 0.95, 0.1]) == [0.9, 0.9, 0.95, 0.95]


def test_tally_candidates_are_the_new_s_not_its_opposite():
    """The reference measured the ratios at s - alpha and used them after moving s to s + alpha (and vice
    versa); here the fraction used for s_up is measured at s_up."""
    t = Tally([1.0], 1, *Ratios(0.5, [1.0], [1.0]).candidates(0.25))
    norms = {0: torch.tensor([6.0, 2.0, 1.0, 1.0])}  # 60% in one row, 80% in two, 90% in three
    for _ in range(2):
        t.add_exact({0: torch.zeros(3)}, norms, {})
    e = t.estimates()
    assert (t.s_up, t.s_down) == (0.75, 0.25) and e.frac_up == [0.5] and e.frac_down == [0.25]


def run_controller(monkeypatch, *overrides: str, steps: int = 8) -> list[tuple[Ratios, Estimates]]:
    """Train ``steps`` steps calibrating after each; returns each calibration's (new ratios, estimates)."""
    import engine.methods.vcas as vcas_module

    history = []

    def spy(r, e, cfg):
        history.append((update(r, e, cfg), e))
        return history[-1][0]

    monkeypatch.setattr(vcas_module, "update", spy)
    model = tiny_model(seed=3, dropout=0.1)
    engine = PlainEngine(model)
    stack = methods_for(model, engine, B=B, method="vcas",
                        overrides=("vcas.calib_every=1", "vcas.rho_decay=0", *overrides))
    sched = schedule_for(SerialSchedule, engine, stack, batch_stream(lambda d: B))
    torch.manual_seed(0)
    for d in range(steps):
        sched.micro_step(d, d)
    return history


def test_a_huge_tau_drives_the_ratios_down(monkeypatch):
    low = [r for r, _ in run_controller(monkeypatch, "vcas.tau_act=1e9", "vcas.tau_w=1e9", "vcas.alpha=0.25",
                                        "vcas.beta=0.5")]
    assert len(low) == 7  # every step but the first (one batch is not a variance)
    assert [r.s for r in low[:4]] == [0.75, 0.5, 0.25, 0.0]
    assert max(low[-1].rho) < 0.5 and low[-1].nu == [0.05] * 18
    assert all(r.rho == monotone(r.rho) for r in low)


def test_a_zero_tau_admits_no_sampling_variance(monkeypatch):
    """tau = 0: rows stay exact; a weight ratio may fall only while sampling at it adds no variance (the
    tokens it drops carry no gradient: padding, positions no loss reads), never further."""
    history = run_controller(monkeypatch, "vcas.tau_act=0", "vcas.tau_w=0")
    assert all(r.s == 1.0 and r.rho == [1.0] * 3 and sum(e.act) == 0 for r, e in history)
    for (old, _), (new, e) in zip([(Ratios.exact(3, 18), None), *history], history):
        assert all(new.nu[i] > old.nu[i] or new.nu[i] == 1.0 for i in range(18) if e.w[i] > 0)
    assert min(min(r.nu) for r, _ in history) > 0.5


def test_calibration_leaves_gradients_rng_and_data_alone():
    """Mid accumulation window: .grad untouched, the global RNG where it was, no batch drawn."""
    model = tiny_model(seed=3, dropout=0.1)
    vcas = vcas_for(model, "vcas.rho_decay=0", "vcas.alpha=0.5", "vcas.tau_act=1e9")
    for d in range(2):
        batch = random_batch(G=B, seed=d)
        vcas.before_forward(batch, ctx(d))
        model(**batch)["loss"].backward()
        vcas.after_backward(ctx(d))
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    state = torch.get_rng_state()
    vcas.calibrate(step=1, rank=0)
    assert all(torch.equal(p.grad, before[n]) for n, p in model.named_parameters())
    assert torch.equal(torch.get_rng_state(), state)
    assert vcas.ratios.s == 0.5 and vcas.calibrations == 1


def test_inner_passes_draw_independently(monkeypatch):
    """The reference reseeded every inner pass identically, so its Monte Carlo repeated one sample."""
    model = tiny_model(seed=3, dropout=0.1)
    vcas = vcas_for(model, "vcas.adaptive=false", "vcas.rho=0.5", "vcas.calib_batches=3")
    for d in range(3):
        vcas.before_forward(random_batch(G=B, seed=d), ctx(d))
    seen = []
    monkeypatch.setattr(Tally, "add_sampled", lambda self, g, w: seen.append(g[0]))
    monkeypatch.setattr(Tally, "estimates", lambda self: Estimates(*([[0.0] * 18] * 4), [1.0] * 3, [1.0] * 3))
    vcas.calibrate(step=0, rank=0)
    assert len(seen) == 9
    for b in range(3):  # per batch: the same dropout, different row draws
        same_batch = seen[3 * b:3 * b + 3]
        assert not (torch.equal(same_batch[0], same_batch[1]) and torch.equal(same_batch[1], same_batch[2]))


def test_state_round_trip_resumes_the_controller():
    model = tiny_model(seed=3)
    vcas = vcas_for(model, "vcas.tau_act=1e9", "vcas.alpha=0.3")
    for d in range(2):
        vcas.before_forward(random_batch(G=B, seed=d), ctx(d))
    vcas.calibrate(step=0, rank=0)
    state = vcas.state_dict()
    other = vcas_for(tiny_model(seed=3), "vcas.tau_act=1e9", "vcas.alpha=0.3")
    other.load_state_dict(state)
    assert other.ratios == vcas.ratios and other.calibrations == 1
    assert all(torch.equal(a[k], b[k]) for a, b in zip(other.recent, vcas.recent, strict=True) for k in a)
    with pytest.raises(ValueError, match="1 block and 18 Linear ratios"):
        other.load_state_dict({**state, "rho": [1.0]})


def test_config_errors():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["method=vcas", "vcas.rho=0.5", "vcas.calib_batches=1", "vcas.beta=1.5", "vcas.nu=0"])
    text = str(e.value)
    for part in ("vcas.rho=0.5, vcas.nu=0.0: fixed ratios need vcas.adaptive=false", "vcas.calib_batches: must be >= 2",
                 "vcas.beta: must be in (0, 1)", "vcas.nu: must be in (0, 1]"):
        assert part in text
    cfg = load_config(None, ["method=sift+vcas", "train.compile=true"])
    with pytest.raises(ConfigError, match="train.compile: not supported with method vcas"):
        prepare_methods(cfg, tiny_model())


def test_a_family_without_block_linears_is_a_config_error(monkeypatch):
    from engine.models.bert import SiftBert

    cfg = load_config(None, ["method=vcas"])
    monkeypatch.setattr(SiftBert, "block_linears", ())
    with pytest.raises(ConfigError, match="model family 'bert' declares no block Linears"):
        prepare_methods(cfg, tiny_model())
    from engine.models.base import BlockLinear

    monkeypatch.setattr(SiftBert, "block_linears", (BlockLinear("attention.self.nope", token_local=True),))
    with pytest.raises(ConfigError, match="'attention.self.nope', which is not an nn.Linear"):
        prepare_methods(cfg, tiny_model())


def test_flop_model():
    """Ratio 1 is the model's own training count; Linears scale with rho (1 + nu); the rest does not."""
    from engine.methods.vcas.flops import VcasFlops
    from engine.methods.vcas.layers import Site
    from engine.models.base import FlopCounts

    h, i, T, L = 8, 32, 16, 2
    base = FlopCounts(layers=L, block=T * (8 * h * h + 4 * h * i + 4 * T * h), head=100.0, extra=10.0)
    shapes = [(h, h, True), (h, h, False), (h, h, False), (h, h, True), (h, i, True), (i, h, True)]
    sites = tuple(Site(b * 6 + k, b, "x", local, n_in, n_out) for b in range(L)
                  for k, (n_in, n_out, local) in enumerate(shapes))
    f = VcasFlops(base, T, sites)
    assert f.exact() == base.train() and f.ratio([1.0] * L, [1.0] * 12) == 1.0
    linear = T * (8 * h * h + 4 * h * i)  # per block
    rest = base.forward() + 2 * (base.head + base.extra) + 2 * L * (base.block - linear)
    assert f.train([0.5, 1.0], [0.5] * 12) == pytest.approx(rest + linear * (0.5 * 1.5 + 1.0 * 1.5))
    live = VcasFlops(base, T, sites, live_tokens=4)  # last block: Q, O, up, down at 4 of 16 positions
    local = T * (2 * h * h * 2 + 2 * h * i * 2)
    assert live.exact() == pytest.approx(base.train() - 2 * local * (1 - 4 / 16))
    assert f.calibration([1.0, 1.0], 2) == 2 * f.exact()  # no sampled passes while rho = 1
    assert f.calibration([0.5, 1.0], 2) == pytest.approx(2 * f.exact() + 4 * f.train([0.5, 1.0], [1.0] * 12))
    assert f.ratio([1.0] * L, [1.0] * 12, batches=2, every=10) == pytest.approx(1.2)


def test_non_finite_statistics_keep_the_ratios(monkeypatch):
    model = tiny_model(seed=3)
    vcas = vcas_for(model, "vcas.tau_act=1e9", "vcas.alpha=0.3")
    for d in range(2):
        vcas.before_forward(random_batch(G=B, seed=d), ctx(d))
    nan = float("nan")
    monkeypatch.setattr(Tally, "estimates", lambda self: Estimates([nan] * 18, *([[0.0] * 18] * 3), [1.0] * 3,
                                                                   [1.0] * 3))
    before = vcas.ratios
    vcas.calibrate(step=0, rank=0)
    assert vcas.ratios == before and vcas.stats()["vcas_calib_skipped"] == 1.0


DECODERS = {  # family: (swapped module, per block, a sampled weight)
    "llama": (VcasLinear, 7, "hf.model.layers.0.mlp.down_proj.weight"),
    "gpt2": (VcasConv1D, 4, "hf.transformer.h.0.mlp.c_proj.weight"),
}


@pytest.mark.parametrize("family", sorted(DECODERS))
def test_a_decoder_samples_its_projections_and_is_exact_at_ratio_one(family, monkeypatch):
    """Llama's seven nn.Linears per block become VcasLinear, GPT-2's four Conv1Ds (fused QKV, attention
    output, MLP up and down) VcasConv1D, parameter names unchanged; every position is read, so there is
    no last-block saving. Forced through VCAS's own backward at ratio 1 the gradients are plain
    autograd's bit for bit; at 0.5 they differ."""
    swapped, per_block, weight = DECODERS[family]
    batch = clm_batch(G=B, seed=3)
    plain = tiny_decoder(family, seed=2, dropout=0.0)
    want = grads(plain, batch)
    model = tiny_decoder(family, seed=2, dropout=0.0)
    vcas = vcas_for(model, "vcas.adaptive=false")
    assert sum(isinstance(m, swapped) for m in model.modules()) == per_block * model.num_layers
    assert list(dict(model.named_parameters())) == list(dict(plain.named_parameters()))
    assert model.live_positions(batch) is None
    n = len(vcas.sites)
    monkeypatch.setattr(Pass, "needs_custom", lambda self, site, last: True)
    monkeypatch.setattr(Pass, "needs_sampler", lambda self, block: True)
    monkeypatch.setattr(Vcas, "_training_pass", lambda self, b, c: Pass([1.0] * 3, [1.0] * n, key=1))
    forced = grads(model, batch, vcas)
    assert forced.keys() == want.keys() and all(torch.equal(forced[k], want[k]) for k in want)
    monkeypatch.setattr(Vcas, "_training_pass", lambda self, b, c: Pass([0.5] * 3, [0.5] * n, key=1))
    sampled = grads(model, batch, vcas)
    assert all(torch.isfinite(g).all() for g in sampled.values())
    assert not torch.equal(sampled[weight], want[weight])


@pytest.mark.parametrize("recorder", [False, True])
def test_a_transposed_weight_samples_like_the_linear_it_stores(recorder):
    """The sampled backward of a Conv1D-layout weight W (in, out) is that of the Linear with weight W^T,
    for the same draws: kept rows, leverage-sampled tokens, and in a calibration pass the recorded weight
    entries (each indexing the weight as it is stored) and the weight-sampling variances."""
    g = torch.Generator().manual_seed(0)
    N, T, n_in, n_out = 6, 5, 7, 4
    x = torch.randn(N, T, n_in, generator=g, dtype=torch.float64)
    w_conv = torch.randn(n_in, n_out, generator=g, dtype=torch.float64)
    bias = torch.randn(n_out, generator=g, dtype=torch.float64)
    out_grad = torch.randn(N, T, n_out, generator=g, dtype=torch.float64)
    conv_entries = torch.randperm(n_in * n_out, generator=g)[:10]
    entries = {True: conv_entries, False: (conv_entries % n_out) * n_in + conv_entries // n_out}  # (i, o) -> (o, i)
    got = {}
    for transposed in (False, True):
        rec = Recorder([entries[transposed]], exact=False, nu_down=[0.25]) if recorder else None
        plan = Pass([0.5], [0.5], key=7, recorder=rec)
        plan.rows[0] = torch.tensor([1, 2, 4])
        weight = (w_conv if transposed else w_conv.t().contiguous()).requires_grad_()
        xi, b = x.clone().requires_grad_(), bias.clone().requires_grad_()
        site = Site(0, 0, "proj", False, n_in, n_out, transposed=transposed)
        out = SampledLinear.apply(xi, weight, b, plan, site, Shared(1))
        out.backward(out_grad)
        got[transposed] = out.detach(), xi.grad, weight.grad, b.grad, rec
    (out_l, gx_l, gw_l, gb_l, rec_l), (out_c, gx_c, gw_c, gb_c, rec_c) = got[False], got[True]
    close = {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(out_c, out_l, **close)
    torch.testing.assert_close(gx_c, gx_l, **close)
    torch.testing.assert_close(gb_c, gb_l, **close)
    assert torch.all(gx_c[[0, 3, 5]] == 0) and torch.all(gx_c[[1, 2, 4]] != 0)  # only the kept rows
    if recorder:
        assert gw_c is None and gw_l is None  # a calibration pass records instead
        torch.testing.assert_close(rec_c.grads[0], rec_l.grads[0], **close)
        torch.testing.assert_close(rec_c.w_var[0], rec_l.w_var[0], **close)
    else:
        torch.testing.assert_close(gw_c, gw_l.t(), **close)
