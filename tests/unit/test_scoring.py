"""Early-exit scoring: exactness at j = L, and that the scorer touches nothing it should not."""

from __future__ import annotations

import pytest
import torch

from engine.scoring import exit_scores, per_sequence_mean, scores_from_logits, token_entropy
from tests.helpers import random_batch, tiny_model


@pytest.mark.parametrize("use_nsp", [True, False])
def test_exit_at_last_layer_equals_full_model_per_sequence_loss(use_nsp):
    model = tiny_model(use_nsp=use_nsp).eval()
    batch = random_batch(G=8)
    with torch.no_grad():
        full = model(**batch)["per_seq_loss"]
    exit_l = exit_scores(model.exit_path(model.num_layers), batch, "loss")
    torch.testing.assert_close(exit_l, full, rtol=0, atol=1e-5)
    # and a shallower exit is a genuinely different function
    assert not torch.allclose(exit_scores(model.exit_path(1), batch, "loss"), full, atol=1e-3)


def test_scorer_leaves_parameters_gradients_autograd_and_rng_untouched():
    model = tiny_model().train()
    batch = random_batch(G=8)
    model(**batch)["loss"].backward()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    rng = torch.get_rng_state()
    flags = {n: m.training for n, m in model.named_modules()}

    scores = exit_scores(model.exit_path(2), batch, "entropy")

    assert not scores.requires_grad and scores.grad_fn is None
    assert torch.is_grad_enabled()
    assert torch.equal(torch.get_rng_state(), rng), "the scorer drew from the global RNG (dropout?)"
    assert {n: m.training for n, m in model.named_modules()} == flags
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n]), n
        if n in grads:
            assert torch.equal(p.grad, grads[n]), n


def test_scorer_runs_without_dropout_even_in_train_mode():
    model = tiny_model(dropout=0.5).train()
    batch = random_batch(G=6)
    a = exit_scores(model.exit_path(2), batch, "loss")
    b = exit_scores(model.exit_path(2), batch, "loss")
    assert torch.equal(a, b)
    with torch.no_grad():
        model.eval()
        ref = exit_scores(model.exit_path(2), batch, "loss")
    assert torch.equal(a, ref)


def test_rows_without_masked_tokens_score_zero():
    logits = torch.randn(3, 4, 10)
    labels = torch.tensor([[1, 2, -100, -100], [-100, -100, -100, -100], [3, 3, 3, 3]])
    for criterion in ("loss", "entropy"):
        s = scores_from_logits(logits, labels, criterion)
        assert s.shape == (3,)
        assert s[1] == 0.0 and s[0] > 0 and s[2] > 0


def test_entropy_and_mean_values():
    uniform = torch.zeros(1, 2, 8)
    torch.testing.assert_close(token_entropy(uniform), torch.full((1, 2), torch.log(torch.tensor(8.0)).item()))
    vals = torch.tensor([[1.0, 3.0, 100.0]])
    valid = torch.tensor([[True, True, False]])
    assert per_sequence_mean(vals, valid).item() == 2.0
    with pytest.raises(ValueError, match="criterion"):
        scores_from_logits(torch.zeros(1, 1, 2), torch.zeros(1, 1, dtype=torch.long), "margin")


def test_head_only_at_masked_positions_matches_stock_head():
    """The gathered head equals the stock HF head's logits at those positions."""
    model = tiny_model().eval()
    batch = random_batch(G=4)
    with torch.no_grad():
        stock = model.hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         token_type_ids=batch["token_type_ids"]).prediction_logits
        path = model.exit_path(model.num_layers)
        mine = path.logits(path.hidden(batch))
    pos = batch["mlm_positions"]
    expected = stock.gather(1, pos[..., None].expand(-1, -1, stock.shape[-1]))
    torch.testing.assert_close(mine, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("criterion", ["loss", "entropy"])
def test_chunked_scoring_equals_one_chunk(criterion):
    model = tiny_model().eval()
    batch = random_batch(G=7)
    P, V = batch["mlm_labels"].shape[1], model.config.vocab_size
    whole = exit_scores(model.exit_path(2), batch, criterion)
    for rows in (1, 3):  # chunks of 1 and 3 rows (the last one shorter)
        chunked = exit_scores(model.exit_path(2), batch, criterion, chunk_elements=rows * P * V)
        torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)
