from __future__ import annotations

import itertools

import pytest

from engine.config import ConfigError, OptimConfig, load_config
from engine.optim import build_optimizer, lr_factor, param_groups, schedule_horizon, warmup_steps
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


def _lrs(model, cfg: OptimConfig, train_steps: int, n: int) -> list[float]:
    optimizer, schedule = build_optimizer(model, cfg, train_steps, cuda=False)
    out = []
    for _ in range(n):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return out


def test_schedule_steps_sets_the_horizon_so_a_run_and_its_continuation_share_one_schedule():
    model = tiny_model()
    W, C = 30, 70
    full = _lrs(model, OptimConfig(lr=1e-3, warmup_fraction=0.1), W + C, W + C)
    warm = _lrs(model, OptimConfig(lr=1e-3, warmup_fraction=0.1, schedule_steps=W + C), W, W)
    assert warm == full[:W]  # the warm-up part follows the long schedule, warm-up included (10 steps, not 3)
    assert warm != _lrs(model, OptimConfig(lr=1e-3, warmup_fraction=0.1), W, W)
    # the continuation resumes the scheduler at step W: the same factor as the uninterrupted run's
    assert lr_factor(W, total_steps=schedule_horizon(OptimConfig(schedule_steps=W + C), W), warmup=10,
                     decay="linear") * 1e-3 == pytest.approx(full[W])
    assert schedule_horizon(OptimConfig(), 123) == 123


def test_schedule_steps_shorter_than_the_run_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="optim.schedule_steps=50 is shorter than train.steps=100"):
        load_config(None, ["train.steps=100", "optim.schedule_steps=50"])
    assert load_config(None, ["train.steps=100", "optim.schedule_steps=100"]).optim.schedule_steps == 100
