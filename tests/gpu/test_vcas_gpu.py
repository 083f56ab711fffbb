"""VCAS on a GPU: its row and token draws come from CUDA generators keyed by (seed, draw, rank, site), so a
key gives the same gradients again and another key others; through its own backward at ratio 1 it gives
plain autograd's gradients; a calibration leaves the CUDA RNG where it was. Tiny BERT and GPT-2 (whose
projections are transformers Conv1Ds) in fp32. Skipped without CUDA (tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

from data_pipeline.batch import to_device
from engine.methods import MicroContext
from engine.methods.vcas import Vcas
from engine.methods.vcas.layers import Pass
from tests.helpers import PlainEngine, clm_batch, methods_for, random_batch, tiny_decoder, tiny_model

pytestmark = pytest.mark.gpu

B = 8
SAMPLED = {"bert": "hf.bert.encoder.layer.0.intermediate.dense.weight", "gpt2": "hf.transformer.h.0.mlp.c_fc.weight"}


def model_for(family: str):
    model = tiny_model(seed=2, dropout=0.0) if family == "bert" else tiny_decoder("gpt2", seed=2, dropout=0.0)
    return model.to("cuda")


def batch_for(family: str, seed: int):
    return to_device(random_batch(G=B, seed=seed) if family == "bert" else clm_batch(G=B, seed=seed), "cuda")


def assert_near(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    """Equal to fp32 rounding, scaled to the tensor (another GEMM or attention kernel may round differently;
    a different draw moves entries by a sizeable fraction of the largest)."""
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()), msg=name)


def vcas_on_cuda(model, *overrides: str) -> Vcas:
    stack = methods_for(model, PlainEngine(model), B=B, method="vcas", device="cuda", overrides=overrides)
    return next(m for m in stack.methods if m.name == "vcas")


def grads(model, batch, vcas: Vcas | None = None, draw: int = 0) -> dict[str, torch.Tensor]:
    ctx = MicroContext(draw=draw, step=0, rank=0, world_size=1, grad_accum=1)
    model.zero_grad(set_to_none=True)
    if vcas is not None:
        vcas.before_forward(batch, ctx)
    model(**batch)["loss"].backward()
    if vcas is not None:
        vcas.after_backward(ctx)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_draws_are_keyed_and_ratio_one_is_plain_autograd(family, monkeypatch):
    batch = batch_for(family, seed=3)
    want = grads(model_for(family), batch)
    model = model_for(family)
    vcas = vcas_on_cuda(model, "vcas.adaptive=false", "vcas.live_positions=false")
    sites, blocks = len(vcas.sites), model.num_layers
    monkeypatch.setattr(Pass, "needs_custom", lambda self, site, last: True)
    monkeypatch.setattr(Pass, "needs_sampler", lambda self, block: True)
    monkeypatch.setattr(Vcas, "_training_pass", lambda self, b, c: Pass([1.0] * blocks, [1.0] * sites, key=1))
    forced = grads(model, batch, vcas)
    assert forced.keys() == want.keys()
    for k in want:
        assert_near(forced[k], want[k], k)

    monkeypatch.setattr(Vcas, "_training_pass", lambda self, b, c: Pass([0.5] * blocks, [0.5] * sites, key=c.draw))
    first, again, other = (grads(model, batch, vcas, draw=d) for d in (1, 1, 2))
    assert all(torch.isfinite(g).all() for g in first.values())
    weight = SAMPLED[family]
    assert (first[weight] - want[weight]).abs().max() > 1e-3 * want[weight].abs().max()  # it sampled
    for k in want:  # the same key draws the same rows and tokens
        assert_near(again[k], first[k], k)
    assert (other[weight] - first[weight]).abs().max() > 1e-3 * first[weight].abs().max()  # another key, others


def test_calibration_runs_and_leaves_the_cuda_rng_alone():
    model = model_for("bert")
    vcas = vcas_on_cuda(model, "vcas.rho_decay=0", "vcas.alpha=0.5", "vcas.tau_act=1e9", "vcas.tau_w=1e9")
    for d in range(vcas.cfg.calib_batches):
        grads(model, batch_for("bert", seed=d), vcas, draw=d)
    state = torch.cuda.get_rng_state()
    vcas.calibrate(step=1, rank=0)
    assert torch.equal(torch.cuda.get_rng_state(), state)
    assert vcas.ratios.s == 0.5 and vcas.calibrations == 1 and min(vcas.ratios.nu) < 1
