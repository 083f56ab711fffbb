"""SiftTrainer (sift_hf) against the plain transformers Trainer and the project's scorer, on CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import Trainer

from engine.scoring import exit_scores
from engine.selection import topk_indices
from sift_hf import SiftArguments, SiftTrainer, UnsupportedError, with_sift
from sift_hf.models import adapter_batch, adapter_for
from sift_hf.trainer import check_trainer_hooks
from tests.hf_helpers import FAMILIES, InOrder, Rows, hf_model, losses, quiet, rows, training_args, weights

quiet()


class Recording(SiftTrainer):
    """Records, per accumulation window, the weights at its start, the gross batches, the kept batches and
    the token count the Trainer normalises by; and every micro-batch a training step trains on."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.windows, self.trained = [], []

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        start, gross = weights(self.model), []

        def tap():
            for b in epoch_iterator:
                gross.append(b)
                yield b

        kept, items = super().get_batch_samples(tap(), num_batches, device)
        self.windows.append((start, gross, kept, items))
        return kept, items

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.trained.append({k: v.clone() for k, v in inputs.items()})
        return super().training_step(model, inputs, num_items_in_batch)


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_keep_one_is_the_plain_trainer_bitwise(tmp_path, family):
    data = rows(family)
    plain = Trainer(model=hf_model(family), args=training_args(tmp_path / "a"), train_dataset=data)
    plain.train()
    sift = SiftTrainer(model=hf_model(family), args=training_args(tmp_path / "b"), train_dataset=data,
                       sift=SiftArguments(keep=1.0))
    sift.train()
    assert losses(sift) == losses(plain)
    for (k, a), b in zip(weights(plain.model).items(), weights(sift.model).values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_random_policy_is_a_plain_trainer_fed_the_kept_rows(tmp_path, family):
    data = rows(family)
    sift = Recording(model=hf_model(family), args=training_args(tmp_path / "s"), train_dataset=data,
                     sift=SiftArguments(keep=0.5, policy="random"))
    sift.train()
    assert len(sift.trained) == 6 and all(len(b["input_ids"]) == 4 for b in sift.trained)
    kept = Rows({k: torch.cat([b[k] for b in sift.trained]) for k in sift.trained[0]})
    plain = InOrder(model=hf_model(family), args=training_args(tmp_path / "p"), train_dataset=kept)
    plain.train()
    assert losses(sift) == losses(plain)
    for (k, a), b in zip(weights(plain.model).items(), weights(sift.model).values()):
        assert torch.equal(a, b), k


def _independent_scores(family: str, start: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean exit-1 token loss per row from the stock model truncated to one block (no sift_hf code)."""
    model = hf_model(family, layers=1)
    model.load_state_dict(start, strict=False)  # the blocks beyond the first are left out
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"]
    if family != "bert":  # next-token targets
        logits, labels = logits[:, :-1], labels[:, 1:]
    ce = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none", ignore_index=-100)
    valid = labels != -100
    return (ce * valid).sum(1) / valid.sum(1)


@pytest.mark.parametrize("family", FAMILIES)
def test_topk_keeps_what_the_scorer_ranks_highest_and_counts_kept_tokens(tmp_path, family):
    B = 4
    sift = Recording(model=hf_model(family), args=training_args(tmp_path, B=B, steps=2), train_dataset=rows(family),
                     sift=SiftArguments(keep=0.5, criterion="loss", exit_layer=1))
    sift.train()
    assert len(sift.windows) == 2
    for start, gross, kept, items in sift.windows:
        live = hf_model(family)
        live.load_state_dict(start)
        adapter = adapter_for(live)
        expected_tokens = gross_tokens = 0
        for g, k in zip(gross, kept):
            assert len(g["input_ids"]) == 2 * B
            scores = exit_scores(adapter.exit_path(1), adapter_batch(g, family), "loss")
            torch.testing.assert_close(scores, _independent_scores(family, start, g), rtol=1e-5, atol=1e-5)
            top = topk_indices(scores, B)
            for key in g:
                assert torch.equal(k[key], g[key][top]), key
            shift = 1 if sift._loss_shifts_labels else 0  # the Trainer's own counting rule for this model
            expected_tokens += int((g["labels"][top][:, shift:] != -100).sum())
            gross_tokens += int((g["labels"][:, shift:] != -100).sum())
        assert int(items) == expected_tokens < gross_tokens  # normalised by the kept rows' tokens only


def test_trainer_hook_canary(tmp_path):
    """Fails loudly if a transformers release moves or reshapes the hook selection relies on: the
    micro-batches of a window must be pulled by get_batch_samples, counted by _get_num_items_in_batch
    and handed, as returned, to training_step with that count."""
    check_trainer_hooks(Trainer)
    seen = {"windows": [], "steps": []}

    class Probe(Trainer):
        def get_batch_samples(self, epoch_iterator, num_batches, device):
            batches, items = super().get_batch_samples(epoch_iterator, num_batches, device)
            seen["windows"].append(([id(b) for b in batches], items))
            return batches, items

        def training_step(self, model, inputs, num_items_in_batch=None):
            seen["steps"].append((id(inputs), num_items_in_batch))
            return super().training_step(model, inputs, num_items_in_batch)

    Probe(model=hf_model("gpt2"), args=training_args(tmp_path, steps=2), train_dataset=rows("gpt2")).train()
    assert len(seen["windows"]) == 2 and len(seen["steps"]) == 4
    for w, (ids, items) in enumerate(seen["windows"]):
        assert items is not None, "the Trainer no longer counts label tokens for a causal LM"
        for i, (step_id, step_items) in enumerate(seen["steps"][2 * w:2 * w + 2]):
            assert step_id == ids[i] and step_items is items


def test_supported_range_is_stated_consistently_and_installed():
    """transformers >= 5.0, < 6 and accelerate >= 1.1: what pyproject.toml requires, the README and sift_hf
    state, check_trainer_hooks accepts, and what this environment runs (the canary above tests its hooks)."""
    from importlib.metadata import version
    from pathlib import Path

    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")

    import sift_hf
    from sift_hf.models import SUPPORTED_VERSIONS

    repo = Path(__file__).resolve().parents[2]
    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    required = {r.name: r.specifier for r in map(Requirement, project["dependencies"] + project["optional-dependencies"]["hf"])}
    assert str(required["transformers"]) == "<6,>=5.0" and str(required["accelerate"]) == ">=1.1"
    for text in ((repo / "README.md").read_text(), sift_hf.__doc__):
        assert "transformers >= 5.0, < 6" in text and "accelerate >= 1.1" in text
    assert {name: SpecifierSet(spec) for name, spec in SUPPORTED_VERSIONS.items()} == {
        name: required[name] for name in SUPPORTED_VERSIONS}
    for name in ("transformers", "accelerate"):
        assert version(name) in required[name], f"{name} {version(name)} is outside the supported {required[name]}"


def test_libraries_outside_the_supported_range_are_refused(monkeypatch):
    """An accelerate or transformers outside the range is named, in the Trainer's check and the selector's."""
    import importlib.metadata

    from sift_hf import SiftSelector
    from sift_hf.trainer import check_trainer_hooks

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: {"accelerate": "1.0.1", "transformers": "6.1.0"}.get(name) or real(name))
    with pytest.raises(UnsupportedError, match=r"transformers 6\.1\.0 \(need >=5\.0,<6\); accelerate 1\.0\.1 \(need >=1\.1\)"):
        check_trainer_hooks(SiftTrainer)
    with pytest.raises(UnsupportedError, match=r"accelerate loop: transformers 6\.1\.0 .*accelerate 1\.0\.1"):
        SiftSelector(object(), object(), micro_batch_size=2)


def test_a_trainer_without_the_hook_is_refused():
    class Moved(Trainer):
        get_batch_samples = None

    with pytest.raises(UnsupportedError, match="get_batch_samples is missing"):
        with_sift(Moved)


def test_arguments_list_every_problem():
    from engine.config import ConfigError

    with pytest.raises(ConfigError) as e:
        SiftArguments(method="sift+vcas", keep=1.5, criterion="nope", kepp=1, schedule="pipelined", vcas={"rho": 2},
                      policy="importance")
    text = str(e.value)
    for part in ("sift.kepp: unknown key (did you mean 'keep'?)", "sift.keep: must be in (0, 1]", "sift.criterion",
                 "sift.schedule: 'pipelined'", "vcas.rho: must be in (0, 1]", "sift.policy: 'importance'"):
        assert part in text
    with pytest.raises(ConfigError, match="sift.criterion: 'reducible' is not available"):
        SiftArguments(criterion="reducible")
    with pytest.raises(ConfigError, match="B / keep = 10.6667 must be a whole number"):
        SiftTrainer(model=hf_model("gpt2"), args=training_args("unused", B=4), sift=SiftArguments(keep=0.375))


def test_unsupported_models_and_batches_are_refused(tmp_path):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    with pytest.raises(UnsupportedError, match="must be a GPT2LMHeadModel"):
        SiftTrainer(model=GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_embd=32, n_head=2)),
                    args=training_args(tmp_path))
    batch = rows("gpt2")[:]
    left = dict(batch, attention_mask=batch["attention_mask"].flip(1))
    with pytest.raises(UnsupportedError, match="left-padded"):
        adapter_batch(left, "gpt2")
    with pytest.raises(UnsupportedError, match="padding-free / flattened"):
        adapter_batch(dict(batch, position_ids=torch.arange(T_ := batch["input_ids"].shape[1]).expand(64, T_)), "gpt2")


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_vcas_at_ratio_one_is_the_plain_trainer_bitwise(tmp_path, family):
    """(BERT without the last block's live-position saving, which is exact only up to summation order.)"""
    data = rows(family)
    plain = Trainer(model=hf_model(family), args=training_args(tmp_path / "a", steps=2), train_dataset=data)
    plain.train()
    vcas = SiftTrainer(model=hf_model(family), args=training_args(tmp_path / "b", steps=2), train_dataset=data,
                       sift=SiftArguments(method="vcas", vcas={"adaptive": False, "rho": 1.0, "nu": 1.0,
                                                             "live_positions": False}))
    assert type(vcas.model.base_model.encoder.layer[0].intermediate.dense if family == "bert"
                else vcas.model.transformer.h[0].mlp.c_fc).__name__.startswith("Vcas")  # swapped
    vcas.train()
    assert losses(vcas) == losses(plain)
    for (k, a), b in zip(weights(plain.model).items(), weights(vcas.model).values()):
        assert torch.equal(a, b), k


@pytest.mark.slow
def test_resume_with_method_state_equals_an_uninterrupted_run(tmp_path):
    """SIFT + adaptive VCAS (calibrating after every step, so its controller state matters): stopping
    after step 2 and resuming from that checkpoint gives the uninterrupted run's losses and weights."""
    sift = SiftArguments(method="sift+vcas", keep=0.5, vcas={"calib_every": 1, "calib_batches": 2})

    def trainer(out):
        return SiftTrainer(model=hf_model("gpt2"), args=training_args(out, steps=4, save_strategy="steps", save_steps=2),
                           train_dataset=rows("gpt2"), sift=sift)

    whole = trainer(tmp_path / "whole")
    whole.train()
    state = torch.load(tmp_path / "whole" / "checkpoint-2" / "sift_state_rank0.pt", weights_only=False)
    assert state["methods"]["vcas"]["calibrations"] == 2
    resumed = trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-2"))
    assert losses(resumed) == losses(whole)  # steps 1-2 from the checkpoint's log history, 3-4 rerun
    assert resumed._sift_loop.methods.methods[1].ratios == whole._sift_loop.methods.methods[1].ratios
    for (k, a), b in zip(weights(whole.model).items(), weights(resumed.model).values()):
        assert torch.equal(a, b), k
