"""Early-exit scoring: exactness at j = L, the criteria against reference formulas, and that the scorer
touches nothing it should not."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.scoring import (
    exit_scores,
    logit_chunks,
    per_sequence_mean,
    sample_slots,
    scores_from_logits,
    token_cross_entropy,
    token_entropy,
)
from tests.helpers import clm_batch, random_batch, tiny_decoder, tiny_model


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


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_our_attention_mask_matches_transformers_and_needs_no_host_read(impl, monkeypatch):
    """Under SDPA the layers get a broadcast (G, 1, 1, T) key mask built on the device (transformers'
    own mask creation reads `padding_mask.all()` to the host); the outputs equal the stock model's."""
    from transformers import masking_utils

    model = tiny_model(dropout=0.0).eval()
    model.hf.config._attn_implementation = impl
    batch = random_batch(G=6, short_rows=3)
    with torch.no_grad():
        stock = model.hf.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              token_type_ids=batch["token_type_ids"]).last_hidden_state
        if impl == "sdpa":
            def refuse(*_, **__):
                raise AssertionError("transformers read the padding mask to the host")
            monkeypatch.setattr(masking_utils, "_ignore_bidirectional_mask_sdpa", refuse)
        path = model.exit_path(model.num_layers)
        mine = path.hidden(batch)
        out = model(**batch)
    pos = batch["mlm_positions"]
    expected = stock.gather(1, pos[..., None].expand(-1, -1, stock.shape[-1]))
    torch.testing.assert_close(mine, expected, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(out["loss"])


@pytest.mark.parametrize("criterion", ["loss", "entropy"])
@pytest.mark.parametrize("fam", ["gpt2", "llama"])
def test_chunks_over_rows_and_positions_equal_one_chunk(fam, criterion):
    """A decoder row is T x V logits: when one row exceeds the chunk, the scorer cuts positions too."""
    model = tiny_decoder(fam).eval()
    batch = clm_batch(G=5)
    T, V = batch["labels"].shape[1], model.config.vocab_size
    path = model.exit_path(2)
    whole = exit_scores(path, batch, criterion)
    for chunk in (2 * T * V, T * V // 3, V, 1):  # two rows; a third of a row; one position; less than one
        torch.testing.assert_close(exit_scores(path, batch, criterion, chunk_elements=chunk), whole,
                                   rtol=1e-6, atol=1e-6)


def test_logit_chunks_tile_the_grid_within_the_bound():
    for rows, positions, vocab, bound in [(7, 5, 3, 100), (7, 5, 3, 15), (3, 10, 4, 12), (2, 9, 50, 10), (4, 6, 2, 1000)]:
        seen = torch.zeros(rows, positions, dtype=torch.int64)
        for r, c in logit_chunks(rows, positions, vocab, bound):
            block = seen[r, c]
            assert block.numel() * vocab <= max(bound, vocab)  # never less than one position
            seen[r, c] += 1
        assert torch.equal(seen, torch.ones_like(seen))


def test_sample_slots_draws_k_valid_slots_per_row():
    valid = torch.ones(4, 10, dtype=torch.bool)
    valid[:, -1] = False  # a decoder row's last position has no target
    valid[3, 2:] = False  # a row with only 2 valid slots
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    slots = sample_slots(valid, 4, gen())
    assert slots.shape == (4, 4) and torch.equal(slots, sample_slots(valid, 4, gen()))
    assert torch.all(slots[:, 1:] > slots[:, :-1])  # ascending, no repeats
    assert valid[:3].gather(1, slots[:3]).all() and valid[3].sum() == valid[3, slots[3]].sum() == 2
    other = sample_slots(valid, 4, torch.Generator().manual_seed(6))
    assert not torch.equal(other, slots)
    counts = torch.zeros(10)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):  # every valid slot is drawn about equally often
        counts += torch.zeros(10).index_add_(0, sample_slots(valid[:1], 3, g)[0], torch.ones(3))
    assert counts[-1] == 0 and counts[:-1].min() > 60


def test_scoring_a_subset_of_positions():
    model = tiny_decoder("gpt2").eval()
    batch = clm_batch(G=6)
    path = model.exit_path(1)
    full = exit_scores(path, batch, "loss")
    gen = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731
    assert torch.equal(exit_scores(path, batch, "loss", positions=32, generator=gen(0)), full)  # all T slots
    sub = exit_scores(path, batch, "loss", positions=8, generator=gen(0))
    assert torch.equal(sub, exit_scores(path, batch, "loss", positions=8, generator=gen(0)))
    assert not torch.equal(sub, exit_scores(path, batch, "loss", positions=8, generator=gen(1)))
    assert not torch.allclose(sub, full) and torch.corrcoef(torch.stack([sub, full]))[0, 1] > 0
    with torch.no_grad():  # each score is the mean exact exit loss over 8 of the row's 31 targets
        logits = path.logits(path.hidden(batch))
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                               batch["labels"][:, :-1].reshape(-1), reduction="none").view(6, 31)
    slots = sample_slots(batch["labels"] >= 0, 8, gen(0))
    torch.testing.assert_close(sub, ce.gather(1, slots).mean(1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="explicit generator"):
        exit_scores(path, batch, "loss", positions=8)


# The formulas the scorer used before it computed logsumexp(z) - z[label] and the shift-invariant entropy
# from one fp32 buffer: a full fp32 copy of the logits and their log-softmax. Kept as the reference.
def old_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    G, P, V = logits.shape
    ce = F.cross_entropy(logits.reshape(G * P, V).float(), labels.reshape(G * P), ignore_index=-100, reduction="none")
    return ce.view(G, P)


def old_entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def logits_and_labels(scale: float, seed: int = 0, V: int = 3000) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(5, 9, V, generator=g) * scale
    logits[0, 0, 7] += 8 * scale  # a confident prediction: entropy near 0
    labels = torch.randint(0, V, (5, 9), generator=g)
    labels[1, 4:] = -100  # unused slots
    labels[2] = -100  # a row without masked tokens
    return logits, labels


@pytest.mark.parametrize("scale", [0.5, 3.0, 12.0])
def test_fp32_criteria_equal_the_log_softmax_formulas(scale):
    logits, labels = logits_and_labels(scale)
    ce = token_cross_entropy(logits, labels)
    torch.testing.assert_close(ce, old_cross_entropy(logits, labels), rtol=0, atol=1e-5)
    assert (ce[labels < 0] == 0).all()
    torch.testing.assert_close(token_entropy(logits), old_entropy(logits), rtol=0, atol=1e-5)
    for criterion in ("loss", "entropy"):
        old = old_cross_entropy(logits, labels) if criterion == "loss" else old_entropy(logits)
        torch.testing.assert_close(scores_from_logits(logits, labels, criterion),
                                   per_sequence_mean(old, labels >= 0), rtol=0, atol=1e-5)


def test_cross_entropy_gradient_equals_the_log_softmax_gradient():
    """The training loss uses token_cross_entropy too: same gradient, bf16 logits included."""
    logits, labels = logits_and_labels(3.0)
    for dtype, atol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-3)):
        z = logits.to(dtype).requires_grad_()
        new, = torch.autograd.grad(token_cross_entropy(z, labels).sum(), z)
        old, = torch.autograd.grad(old_cross_entropy(z, labels).sum(), z)
        assert new.dtype == dtype
        torch.testing.assert_close(new.float(), old.float(), rtol=0, atol=atol)


@pytest.mark.parametrize("scale", [0.5, 3.0, 12.0])
def test_bf16_logits_match_an_fp64_reference(scale):
    """bf16 logits, fp32 accumulation: within a few fp32 ulps (1e-6 relative + 1e-6 nats) of the same formulas
    in fp64 on the same bf16 values; measured up to 2e-6 nats on losses of about 36 nats at scale 12. The
    bf16 rounding of the logits themselves moves the values far more, and is not the criterion's doing."""
    logits, labels = logits_and_labels(scale)
    z = logits.bfloat16()
    z64 = z.double()
    lse = torch.logsumexp(z64, dim=-1)
    ce64 = torch.where(labels >= 0, lse - z64.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1), 0.0)
    h64 = lse - (torch.softmax(z64, dim=-1) * z64).sum(dim=-1)
    ce, h = token_cross_entropy(z, labels), token_entropy(z)
    assert ce.dtype == h.dtype == torch.float32
    torch.testing.assert_close(ce.double(), ce64, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h.double(), h64, rtol=1e-6, atol=1e-6)


def test_entropy_survives_a_large_common_offset():
    """Entropy is shift-invariant; the form lse - sum(p * z) would subtract two numbers near the offset and
    lose the digits the entropy is made of."""
    logits, _ = logits_and_labels(3.0, V=512)
    shifted = logits + 4096.0  # fp32 holds these to 2.4e-4: the truth is the fp64 entropy of these values
    logp = torch.log_softmax(shifted.double(), dim=-1)
    torch.testing.assert_close(token_entropy(shifted).double(), -(logp.exp() * logp).sum(-1), rtol=0, atol=1e-5)
