"""The method interface: a plugin method changes training exactly where it should, without touching the
loop; the method stack's rules; `method` in the run config."""

from __future__ import annotations

import pytest
import torch

from engine.config import ConfigError, load_config
from engine.methods import METHODS, Method, MethodStack
from engine.schedule import SerialSchedule
from tests.helpers import PlainEngine, batch_stream, methods_for, schedule_for, tiny_model

B, G, STEPS, WARMUP = 4, 8, 6, 2


class Recording(PlainEngine):
    """Remembers which rows (sample ids) each training forward saw."""

    def __init__(self, model):
        super().__init__(model)
        self.seen: list[list[int]] = []

    def __call__(self, **batch):
        self.seen.append(batch["sample_ids"].tolist())
        return super().__call__(**batch)


def run(method: str, plugins: tuple[str, ...] = ()):
    model = tiny_model(seed=3)
    engine = Recording(model)
    rows = lambda d: B if d < WARMUP else G  # noqa: E731 (the loader's draw sizes: warm-up, then G)
    methods = methods_for(model, engine, B=B, method=method, exit_layer=1, plugins=plugins)
    sched = schedule_for(SerialSchedule, engine, methods, batch_stream(rows))
    torch.manual_seed(11)
    outs = [sched.micro_step(d, d) for d in range(STEPS)]
    return [o.out["loss"].item() for o in outs], engine.seen, outs


def test_a_plugin_method_differs_from_topk_exactly_where_it_should():
    top_losses, top_rows, top_outs = run("sift")
    low_losses, low_rows, low_outs = run("lowest", plugins=("tests.plugin_lowest",))
    # Warm-up draws select nothing: the same rows, bitwise the same training.
    assert low_rows[:WARMUP] == top_rows[:WARMUP] and low_losses[:WARMUP] == top_losses[:WARMUP]
    # The first selecting draw scores the same batch with the same weights; with G = 2B the lowest B rows
    # are exactly the rows top-k drops.
    first = set(range(G))
    assert set(low_rows[WARMUP]) == first - set(top_rows[WARMUP]) and len(low_rows[WARMUP]) == B
    assert low_outs[WARMUP].stats["kept_score"] < low_outs[WARMUP].stats["dropped_score"]
    assert top_outs[WARMUP].stats["kept_score"] > top_outs[WARMUP].stats["dropped_score"]
    # From there on the weights differ, and so does everything else.
    assert low_losses[WARMUP] != top_losses[WARMUP] and low_losses[-1] != top_losses[-1]


def test_vanilla_is_the_empty_stack_and_spells_two_ways():
    for overrides in (["method=none"], ["sift.policy=none"]):
        cfg = load_config(None, overrides)
        assert cfg.effective_method == "none" and not cfg.selecting and cfg.gross_batch_size == cfg.train.micro_batch_size
    model = tiny_model()
    stack = methods_for(model, PlainEngine(model), B=4, method="none")
    assert stack.methods == [] and stack.selector is None and stack.rows_for_draw(123) == 4
    assert stack.state_dict() == {} and stack.stats() == {}


def test_method_config_errors_are_listed_together():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["method=sift+nope", "sift.criterion=loudness", "train.plugins=[no.such.module]"])
    text = str(e.value)
    assert "'nope' not one of none, sift" in text
    assert "sift.criterion: 'loudness' is not one of loss, entropy" in text
    assert "train.plugins: cannot import 'no.such.module'" in text
    with pytest.raises(ConfigError, match="names a method twice"):
        load_config(None, ["method=sift+sift"])
    with pytest.raises(ConfigError, match="contradicts method"):
        load_config(None, ["method=lowest", "sift.policy=none", "train.plugins=[tests.plugin_lowest]"])


def test_at_most_one_method_selects():
    class Plain(Method):
        name = "plain"

    sift = METHODS["sift"](load_config(None, []))
    assert MethodStack([Plain(), sift], 16).selector is sift
    with pytest.raises(ValueError, match="at most one method may select"):
        MethodStack([sift, METHODS["sift"](load_config(None, []))], 16)
    with pytest.raises(ConfigError, match="at most one method may select rows, got sift, lowest"):
        load_config(None, ["method=sift+lowest", "train.plugins=[tests.plugin_lowest]"])


def test_stateless_method_refuses_foreign_state():
    class Plain(Method):
        name = "plain"

    stack = MethodStack([Plain()], 4)
    stack.load_state_dict({"plain": {}, "other": {"x": 1}})  # another method's state is not ours
    with pytest.raises(ValueError, match="has no state"):
        stack.load_state_dict({"plain": {"x": torch.ones(1)}})


def test_methods_build_from_their_own_settings_as_from_the_run_config():
    """``from_settings(settings, TrainShape)`` (no RunConfig: sift_hf) builds what the registry builds."""
    from engine.methods import TrainShape
    from engine.methods.sift import Sift
    from engine.methods.vcas import Vcas

    cfg = load_config(None, ["method=sift+vcas", "train.micro_batch_size=6", "sift.keep=0.25", "train.grad_accum=3",
                             "train.seed=7", "train.steps=50", "sift.stop_fraction=0.5"])
    shape = TrainShape(micro_batch_size=6, grad_accum=3, seed=7, total_steps=50)
    assert TrainShape.of(cfg) == shape
    a, b = Sift(cfg), Sift.from_settings(cfg.sift, shape)
    assert (a.B, a.G, a.ga, a.seed, a.total_steps) == (b.B, b.G, b.ga, b.seed, b.total_steps) == (6, 24, 3, 7, 50)
    assert [a.rows_for_draw(d) for d in range(0, 90, 3)] == [b.rows_for_draw(d) for d in range(0, 90, 3)]
    v, w = Vcas(cfg), Vcas.from_settings(cfg.vcas, shape)
    assert (v.cfg, v.seed, v.grad_accum, v.compile) == (w.cfg, w.seed, w.grad_accum, w.compile)
