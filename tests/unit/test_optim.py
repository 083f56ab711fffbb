from __future__ import annotations

import itertools

import pytest

from engine.config import OptimConfig
from engine.optim import lr_factor, param_groups, warmup_steps
from tests.helpers import tiny_model


def test_warmup_then_linear_decay_to_zero():
    total = 1000
    warm = warmup_steps(OptimConfig(warmup_fraction=0.002), total)
    assert warm == 2
    f = [lr_factor(s, total_steps=total, warmup=warm, decay="linear") for s in range(total + 1)]
    assert f[0] == 0.5 and f[1] == 1.0 and f[2] == 1.0
    assert f[501] == pytest.approx((1000 - 501) / 998) and f[1000] == 0.0
    assert all(a >= b for a, b in itertools.pairwise(f[2:]))
    assert lr_factor(700, total_steps=total, warmup=warm, decay="constant") == 1.0


def test_no_decay_on_biases_and_layernorm_and_each_parameter_once():
    model = tiny_model()
    groups = param_groups(model, 0.01)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim >= 2 and "LayerNorm" not in names[id(p)] for p in groups[0]["params"])
    assert groups[1]["weight_decay"] == 0.0 and any("LayerNorm" in names[id(p)] for p in groups[1]["params"])
