"""The filled DeepSpeed configs: per-step overhead switched off, "auto" ZeRO buckets sized from the model.

DeepSpeed's own config parser (pydantic models that reject unknown keys) reads every filled dict, so a
misspelled key such as bf16.check_grad_overflow would fail here rather than on a GPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from deepspeed.runtime.config import DeepSpeedConfig
from transformers import BertConfig, BertForPreTraining

from engine.ds_config import (
    MAX_BUCKET,
    MIN_BUCKET,
    DSConfigError,
    RunFacts,
    bucket_sizes,
    fill,
    load_json,
)

ROOT = Path(__file__).resolve().parents[2]
JSONS = sorted((ROOT / "ds_configs").glob("*.json"))
BERT_BASE = 110_106_428  # BertForPreTraining(BertConfig()): sum(p.numel()), tied decoder counted once


def facts(**kw) -> RunFacts:
    base = {"micro_batch_size": 32, "grad_accum": 1, "world_size": 1, "grad_clip": 1.0, "precision": "bf16",
            "num_params": BERT_BASE}
    return RunFacts(**{**base, **kw})


@pytest.fixture(scope="module")
def bert_base_grad_sizes() -> list[int]:
    """Gradient sizes of BERT-base in the order they become ready (reverse of registration); no memory."""
    with torch.device("meta"):
        model = BertForPreTraining(BertConfig())
    sizes = [p.numel() for p in model.parameters()]
    assert sum(sizes) == BERT_BASE
    return sizes[::-1]


def reductions(grad_sizes: list[int], bucket: int) -> int:
    """Collectives per backward under DeepSpeed 0.19.8's ZeRO-1/2 bucketing
    (stage_1_and_2.reduce_independent_p_g_buckets_and_remove_grads): a bucket is reduced when the next
    gradient would overflow it, a gradient larger than the bucket is reduced alone, the rest at the end."""
    count, filled = 0, 0
    for n in grad_sizes:
        if filled + n > bucket and filled:
            count, filled = count + 1, 0
        filled += n
    return count + (filled > 0)


@pytest.mark.parametrize("path", JSONS, ids=lambda p: p.name)
def test_deepspeed_parses_every_filled_config_with_the_overhead_off(path):
    cfg = fill(load_json(path), facts(), path.name)
    ds = DeepSpeedConfig(cfg)
    assert ds.timers_config.enabled is False  # no device-wide synchronize at forward start and step end
    assert ds.bfloat16_config.enabled is True and ds.bfloat16_config.check_grad_overflow is False
    assert ds.wall_clock_breakdown is False and ds.flops_profiler_config.enabled is False
    if ds.zero_optimization_stage in (1, 2, 3):
        assert ds.zero_config.reduce_bucket_size == bucket_sizes(BERT_BASE, 1)["reduce_bucket_size"]


def test_deepspeed_rejects_a_misspelled_key():
    """What makes the test above a check of the key names."""
    cfg = fill(load_json(ROOT / "ds_configs" / "zero1.json"), facts())
    cfg["bf16"]["check_grad_overflw"] = False
    with pytest.raises(ValueError, match="check_grad_overflw"):
        DeepSpeedConfig(cfg)


def test_explicit_settings_are_kept():
    template = {"timers": {"throughput": {"enabled": True}}, "bf16": {"enabled": "auto", "check_grad_overflow": True},
                "zero_optimization": {"stage": 2, "reduce_bucket_size": 12345, "allgather_bucket_size": "auto"}}
    cfg = fill(template, facts(world_size=8))
    assert cfg["timers"]["throughput"]["enabled"] is True and cfg["bf16"]["check_grad_overflow"] is True
    zero = cfg["zero_optimization"]
    assert zero["reduce_bucket_size"] == 12345
    assert zero["allgather_bucket_size"] == bucket_sizes(BERT_BASE, 8)["allgather_bucket_size"]


def test_auto_overlap_comm_overlaps_only_across_ranks():
    """ZeRO-1 reduces in backward hooks only with overlap_comm: on for several ranks, off for one."""
    template = load_json(ROOT / "ds_configs" / "zero1.json")
    assert template["zero_optimization"]["overlap_comm"] == "auto"
    assert fill(template, facts(world_size=8))["zero_optimization"]["overlap_comm"] is True
    assert fill(template, facts(world_size=1))["zero_optimization"]["overlap_comm"] is False
    assert DeepSpeedConfig(fill(template, facts(world_size=1))).zero_config.overlap_comm is False


def test_bert_base_gets_a_handful_of_buckets_not_one_or_a_hundred(bert_base_grad_sizes):
    sizes = bert_base_grad_sizes
    for world in (1, 8, 64):
        bucket = bucket_sizes(BERT_BASE, world)["reduce_bucket_size"]
        assert 3 <= reductions(sizes, bucket) <= 8, world
        assert 2 * bucket * 2 <= 160 * 2**20  # overlap_comm's two bf16 buffers stay small
    assert reductions(sizes, 768 * 768) > 50  # the old hidden^2 rule
    assert reductions(sizes, 500_000_000) == 1  # the old p4d JSON: nothing to overlap with the backward


def test_bucket_rule_bounds():
    assert bucket_sizes(1_000, 1)["reduce_bucket_size"] == MIN_BUCKET  # a tiny model: one latency-bound-free bucket
    assert bucket_sizes(10**12, 8)["reduce_bucket_size"] == MAX_BUCKET
    assert bucket_sizes(BERT_BASE, 256)["reduce_bucket_size"] == 256 * 2**19  # 1 MiB per rank's share
    small, large = bucket_sizes(BERT_BASE, 1), bucket_sizes(7 * 10**9, 1)
    # ZeRO-3 keeps vectors (biases, LayerNorm: <= 4h) whole and partitions every matrix
    assert 4 * 768 < small["stage3_param_persistence_threshold"] < 768 * 768
    assert 4 * 4096 < large["stage3_param_persistence_threshold"] < 4096 * 4096


def test_a_missing_count():
    zero3 = load_json(ROOT / "ds_configs" / "zero3.json")
    with pytest.raises(DSConfigError, match="no parameter count") as e:
        fill(zero3, facts(num_params=None))
    assert len(e.value.problems) == 1
