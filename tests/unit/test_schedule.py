"""Schedules on CPU: serial = score-then-train; pipelined = the one-step-stale schedule, exactly (for a
tiny BERT, GPT-2 and Llama)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from data_pipeline.batch import select_rows, weighted_rows
from engine.schedule import PipelinedSchedule, SerialSchedule
from engine.scoring import exit_scores
from engine.selection import POLICIES, Kept, position_generator, selection_generator
from tests.helpers import PlainEngine, methods_for, model_and_batches, schedule_for

B, G, STEPS, SEED = 4, 8, 8, 0


def rows(d: int) -> int:
    return B if d < 2 else G  # two warm-up draws without selection, then G


def run_schedule(cls, policy="topk", grad_accum=1, criterion="loss", family="bert", positions=0,
                 skip_nonfinite=True, poison_at=None, with_schedule=False):
    model, batch_stream = model_and_batches(family, seed=3)
    engine = PlainEngine(model, grad_accum=grad_accum)
    methods = methods_for(model, engine, B=B, grad_accum=grad_accum, policy=policy, criterion=criterion,
                          exit_layer=2, seed=SEED, score_positions=positions)
    sched = schedule_for(cls, engine, methods, batch_stream(rows), grad_accum=grad_accum,
                         skip_nonfinite=skip_nonfinite)
    torch.manual_seed(11)
    outs = []
    for d in range(STEPS):
        if d == poison_at:
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
        outs.append(sched.micro_step(d, d // grad_accum))
    result = [o.out["loss"].item() for o in outs], [o.stats.get("kept_score") for o in outs], model
    return (*result, sched) if with_schedule else result


def reference(stale: bool, policy="topk", grad_accum=1, criterion="loss", family="bert", positions=0):
    """A direct implementation: score draw k with the weights of micro-step k-1 (stale) or k (serial)."""
    model, batch_stream = model_and_batches(family, seed=3)
    engine = PlainEngine(model, grad_accum=grad_accum)
    scoring_model = copy.deepcopy(model)
    torch.manual_seed(11)
    losses, kept_sets = [], []
    for d, batch in zip(range(STEPS), batch_stream(rows)):
        if not stale:
            scoring_model.load_state_dict(model.state_dict())
        gen = position_generator(SEED, d, 0) if positions else None
        scores = exit_scores(scoring_model.exit_path(2), batch, criterion, positions=positions, generator=gen)
        if stale:
            scoring_model.load_state_dict(model.state_dict())  # the weights batch d+1 will be scored with
        if len(scores) > B:
            idx = POLICIES[policy](scores, B, selection_generator(SEED, d, 0))
            if isinstance(idx, Kept):  # a weighted policy: its rows carry their weights into the loss
                batch = weighted_rows(batch, idx.indices, idx.weights)
                idx = idx.indices
            else:
                batch = select_rows(batch, idx)
            kept_sets.append(idx.tolist())
        else:
            kept_sets.append(None)
        out = engine(**batch)
        engine.backward(out["loss"])
        engine.step()
        losses.append(out["loss"].item())
    return losses, kept_sets, model


@pytest.mark.parametrize("grad_accum", [1, 2])
@pytest.mark.parametrize("criterion", ["loss", "entropy"])
def test_pipelined_on_cpu_equals_the_one_step_stale_reference(grad_accum, criterion):
    losses, _, model = run_schedule(PipelinedSchedule, grad_accum=grad_accum, criterion=criterion)
    ref_losses, _, ref_model = reference(stale=True, grad_accum=grad_accum, criterion=criterion)
    assert losses == ref_losses  # bitwise: the same rows were kept at every step
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize(("family", "criterion", "positions"),
                         [("gpt2", "loss", 0), ("llama", "entropy", 0), ("gpt2", "entropy", 6), ("llama", "loss", 6)])
def test_pipelined_decoders_equal_the_one_step_stale_reference(family, criterion, positions):
    """Tiny GPT-2 and Llama; with ``score_positions`` the positions of draw d come from (seed, d, rank),
    so the pipelined schedule, which scores draw d + 1 during micro-step d, draws what the reference does."""
    kw = {"criterion": criterion, "family": family, "positions": positions}
    losses, _, model = run_schedule(PipelinedSchedule, **kw)
    ref_losses, _, ref_model = reference(stale=True, **kw)
    assert losses == ref_losses
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize(("policy", "family"), [("stratified", "bert"), ("importance", "gpt2")])
def test_weighted_policies_pipelined_equal_the_one_step_stale_reference(policy, family):
    """Weighted selection: the pipelined schedule keeps the rows and weights the direct one-step-stale
    rule keeps (its draws keyed on (seed, draw, rank)) and trains to bitwise the same weights. (Here the
    stratified rule draws and weights rows below the mean at 4 of its 6 selecting draws and overflows at
    the other 2.)"""
    losses, _, model = run_schedule(PipelinedSchedule, policy=policy, family=family)
    ref_losses, _, ref_model = reference(stale=True, policy=policy, family=family)
    assert losses == ref_losses
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref_model.parameters()))


def test_serial_equals_the_fresh_reference_and_differs_from_stale():
    losses, _, _ = run_schedule(SerialSchedule)
    fresh, kept_fresh, _ = reference(stale=False)
    _, kept_stale, _ = reference(stale=True)
    assert losses == fresh
    assert kept_fresh != kept_stale  # staleness changes which rows are kept at some step


def test_random_policy_is_the_same_in_both_schedules():
    assert run_schedule(SerialSchedule, policy="random")[0] == run_schedule(PipelinedSchedule, policy="random")[0]


def test_selection_statistics_are_reported():
    _, kept_means, _ = run_schedule(SerialSchedule)
    assert kept_means[0] is None and kept_means[1] is None  # warm-up draws: no selection
    assert all(k is not None for k in kept_means[2:])


def test_double_buffered_scorer_refreshes_the_idle_replica():
    """The pipelined scorer reads replicas, never the live weights: a refresh after a step writes the
    replica no scoring is reading, and the scores then follow the new weights exactly."""
    from engine.methods.sift import Scorer
    from tests.helpers import random_batch, tiny_model

    model = tiny_model(seed=3)
    batch = random_batch(G=G)
    live = Scorer(model, 2, "loss", device=torch.device("cpu"))
    rng = torch.get_rng_state()
    double = Scorer(model, 2, "loss", device=torch.device("cpu"), replicas=2)
    assert torch.equal(torch.get_rng_state(), rng)  # building replicas leaves the dropout stream alone
    assert live.reads_live_weights and not double.reads_live_weights
    before = double(batch)
    assert torch.equal(before, live(batch))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    assert torch.equal(double(batch), before)  # still the old weights: nothing copied yet
    reading = double.paths[double._current]
    double.refresh()
    assert double.paths[double._current] is not reading  # the idle replica was written, not the one read
    assert torch.equal(exit_scores(reading, batch, "loss"), before)
    assert torch.equal(double(batch), live(batch))


@pytest.mark.parametrize("cls", [SerialSchedule, PipelinedSchedule])
def test_stop_mode_reads_nothing_per_step_and_trains_the_same(cls, monkeypatch):
    """train.nonfinite=stop: no host read of a finiteness flag per micro-step; with finite losses the run is
    bitwise the skip-mode run, and the device count, read once, is 0."""
    skip_losses, _, skip_model = run_schedule(cls)
    monkeypatch.setattr("engine.schedule.all_finite", lambda loss: pytest.fail("stop mode read a flag per step"))
    stop_losses, _, stop_model, sched = run_schedule(cls, skip_nonfinite=False, with_schedule=True)
    assert stop_losses == skip_losses
    assert all(torch.equal(a, b) for a, b in zip(skip_model.state_dict().values(), stop_model.state_dict().values()))
    assert sched.take_nonfinite() == 0


def test_stop_mode_counts_nonfinite_losses_on_the_device():
    """Poisoned weights from micro-step 5 on: skip mode skips 5, 6, 7 (flags read at once); stop mode trains
    through them and counts 3, read once; the count restarts after a read."""
    losses, _, _, sched = run_schedule(SerialSchedule, poison_at=5, with_schedule=True)
    assert all(map(math.isfinite, losses[:5])) and not any(map(math.isfinite, losses[5:]))
    assert sched.take_nonfinite() == 0  # skip mode keeps no count
    *_, sched = run_schedule(SerialSchedule, skip_nonfinite=False, poison_at=5, with_schedule=True)
    assert sched.take_nonfinite() == 3
    assert sched.take_nonfinite() == 0
