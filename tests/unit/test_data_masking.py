"""BERT masking statistics and determinism (pure tensor code, no dataset)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_pipeline.batch import IGNORE_INDEX, max_predictions
from data_pipeline.masking import MaskingConfig, mask_tokens, row_seeds, row_streams

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
SPECIALS = (PAD, UNK, CLS, SEP, MASK)
VOCAB = 1000
CFG = MaskingConfig(mask_token_id=MASK, vocab_size=VOCAB, special_ids=SPECIALS)


def make_rows(G: int, T: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] A [SEP] B [SEP] rows with random lengths, a few [UNK] inside, padding after."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, T + 1, G)
    tokens = rng.integers(len(SPECIALS), VOCAB, (G, T))
    tokens[rng.random((G, T)) < 0.02] = UNK
    for i, L in enumerate(lengths):
        tokens[i, 0], tokens[i, L - 1], tokens[i, L // 2] = CLS, SEP, SEP
        tokens[i, L:] = PAD
    return torch.from_numpy(tokens), torch.from_numpy(lengths)


@pytest.fixture(scope="module")
def big():
    tokens, lengths = make_rows(4000, 128)
    seeds = row_seeds(7, 0, np.arange(len(tokens)))
    return tokens, lengths, mask_tokens(tokens, lengths, CFG, seeds)


def candidates(tokens, lengths):
    special = torch.isin(tokens, torch.tensor(SPECIALS))
    return (torch.arange(tokens.shape[1])[None] < lengths[:, None]) & ~special


def test_shapes_and_contract(big):
    tokens, _lengths, (input_ids, positions, labels) = big
    G, T = tokens.shape
    P = max_predictions(T, CFG.mask_prob)
    assert input_ids.shape == (G, T) and positions.shape == (G, P) and labels.shape == (G, P)
    assert input_ids.dtype == positions.dtype == labels.dtype == torch.int64
    valid = labels != IGNORE_INDEX
    # Valid slots first, positions ascending, labels are the original tokens, unused slots point at 0.
    assert torch.all(valid[:, :-1] >= valid[:, 1:])
    pos_valid = torch.where(valid, positions, torch.full_like(positions, T))
    assert torch.all(pos_valid[:, 1:] >= pos_valid[:, :-1])
    assert torch.equal(torch.where(valid, tokens.gather(1, positions), labels), labels)
    assert torch.all(positions[~valid] == 0)
    # Outside the chosen positions nothing changes.
    changed = input_ids != tokens
    chosen = torch.zeros_like(changed)
    chosen.scatter_(1, positions, valid)
    assert not torch.any(changed & ~chosen)


def test_fifteen_percent_of_candidates_and_never_specials_or_padding(big):
    tokens, lengths, (_, positions, labels) = big
    cand = candidates(tokens, lengths)
    valid = labels != IGNORE_INDEX
    n = cand.sum(1)
    k = valid.sum(1)
    assert torch.equal(k, torch.clamp(torch.round(n.double() * 0.15).long(), min=1).minimum(n))
    assert abs(k.sum().item() / n.sum().item() - 0.15) < 0.005
    picked = torch.zeros_like(cand)
    picked.scatter_(1, positions, valid)
    assert not torch.any(picked & ~cand)  # no special token, no padding is ever chosen
    assert not torch.isin(labels[valid], torch.tensor(SPECIALS)).any()


def test_80_10_10(big):
    _tokens, _, (input_ids, positions, labels) = big
    valid = labels != IGNORE_INDEX
    new = input_ids.gather(1, positions)[valid]
    orig = labels[valid]
    total = valid.sum().item()
    frac_mask = (new == MASK).sum().item() / total
    frac_keep = (new == orig).sum().item() / total
    frac_random = 1 - frac_mask - frac_keep
    assert total > 30_000  # binomial std of each fraction < 0.002: the 0.01 tolerance is > 5 sigma
    assert abs(frac_mask - 0.8) < 0.01 and abs(frac_keep - 0.1) < 0.01 and abs(frac_random - 0.1) < 0.01
    replaced = new[(new != MASK) & (new != orig)]
    assert not torch.isin(replaced, torch.tensor(SPECIALS)).any()  # random ids are never special
    # Random replacements cover the non-special vocabulary roughly uniformly.
    hist = torch.bincount(replaced, minlength=VOCAB)[len(SPECIALS) :].double()
    deciles = hist[: len(hist) // 10 * 10].view(10, -1).sum(1)
    assert deciles.min() > 0.8 * deciles.mean() and deciles.max() < 1.2 * deciles.mean()


def test_positions_are_uniform_over_the_row():
    T = 64
    tokens = torch.randint(len(SPECIALS), VOCAB, (20000, T))
    lengths = torch.full((20000,), T)
    _, positions, labels = mask_tokens(tokens, lengths, CFG, row_seeds(1, 0, np.arange(20000)))
    counts = torch.bincount(positions[labels != IGNORE_INDEX], minlength=T).double()
    assert counts.std() / counts.mean() < 0.05


def test_masks_are_a_pure_function_of_seed_epoch_sample():
    tokens, lengths = make_rows(64, 128, seed=3)
    ids = np.arange(100, 164)
    a = mask_tokens(tokens, lengths, CFG, row_seeds(1, 2, ids))
    b = mask_tokens(tokens, lengths, CFG, row_seeds(1, 2, ids))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    # Same sample in another batch, in another order: the same mask.
    sub = torch.tensor([40, 3, 17])
    c = mask_tokens(tokens[sub], lengths[sub], CFG, row_seeds(1, 2, ids[sub.numpy()]))
    assert all(torch.equal(x[sub], y) for x, y in zip(a, c, strict=True))
    # Another epoch or seed: different masks.
    d = mask_tokens(tokens, lengths, CFG, row_seeds(1, 3, ids))
    e = mask_tokens(tokens, lengths, CFG, row_seeds(2, 2, ids))
    assert not torch.equal(a[1], d[1]) and not torch.equal(a[1], e[1])
    # Per-row epochs (a draw straddling an epoch boundary) match the scalar form row by row.
    mixed = row_seeds(1, np.array([2] * 32 + [3] * 32), ids)
    assert np.array_equal(mixed[:32], row_seeds(1, 2, ids[:32])) and np.array_equal(
        mixed[32:], row_seeds(1, 3, ids[32:])
    )


def test_masking_never_touches_the_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tokens, lengths = make_rows(8, 32)
    mask_tokens(tokens, lengths, CFG, row_seeds(0, 0, np.arange(8)))
    assert torch.equal(torch.rand(3), expected)


def test_rows_without_candidates_get_no_predictions():
    tokens = torch.tensor([[CLS, SEP, PAD, PAD], [CLS, 7, SEP, PAD]])
    lengths = torch.tensor([2, 3])
    cfg = MaskingConfig(mask_token_id=MASK, vocab_size=VOCAB, special_ids=SPECIALS, mask_prob=0.2)
    input_ids, positions, labels = mask_tokens(tokens, lengths, cfg, row_seeds(0, 0, np.arange(2)))
    assert torch.all(labels[0] == IGNORE_INDEX) and torch.equal(input_ids[0], tokens[0])
    assert labels[1, 0] == 7 and positions[1, 0] == 1  # one candidate: at least one prediction


def test_row_streams_are_splitmix64():
    # Reference: the first outputs of SplitMix64 seeded with 0 (published test vector).
    assert row_streams(np.array([0], dtype=np.uint64), 2)[0].tolist() == [
        0xE220A8397B1DCDAF,
        0x6E789E6AA1B965F4,
    ]


def test_config_validation():
    with pytest.raises(ValueError):
        MaskingConfig(mask_token_id=MASK, vocab_size=VOCAB, special_ids=SPECIALS, mask_prob=0.0)
    with pytest.raises(ValueError):
        MaskingConfig(mask_token_id=VOCAB, vocab_size=VOCAB, special_ids=SPECIALS)


def test_a_masked_first_position_stays_masked():
    """Unused slots point at position 0; they must not write its original token back over a [MASK]."""
    tokens = torch.randint(len(SPECIALS), VOCAB, (512, 16))  # no [CLS]: position 0 is a candidate
    lengths = torch.full((512,), 16)
    cfg = MaskingConfig(mask_token_id=MASK, vocab_size=VOCAB, special_ids=SPECIALS, replace_mask=1.0,
                        replace_random=0.0)
    ids, positions, labels = mask_tokens(tokens, lengths, cfg, row_seeds(3, 0, np.arange(512)))
    first = ((positions == 0) & (labels != IGNORE_INDEX)).any(dim=1)
    assert first.sum() > 10  # ~2/16 of the rows mask position 0
    assert (ids[first, 0] == MASK).all()
