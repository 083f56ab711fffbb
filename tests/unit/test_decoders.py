"""GPT-2 and Llama adapters: the early exit is the stock model truncated to j blocks, the training forward
is the stock model's, the loss contract, the scorer's replica, export, FLOPs and the errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engine.config import ConfigError, ModelConfig, load_config
from engine.models import build_model, family
from engine.models.base import DataFacts
from engine.models.decoder import causal_mask
from engine.models.errors import ModelError
from engine.scoring import exit_scores
from tests.helpers import VOCAB, clm_batch, tiny_decoder

FAMILIES = ("gpt2", "llama")


def truncated_stock(model, j: int):
    """The stock Hugging Face model with only its first j blocks, holding the same weights."""
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = j
    stock = type(model.hf)(config).eval()
    missing, _ = stock.load_state_dict(model.hf.state_dict(), strict=False)
    assert not missing
    return stock


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("fam", FAMILIES)
def test_exit_at_j_equals_the_stock_model_truncated_to_j_blocks(fam, attn):
    model = tiny_decoder(fam, layers=3, attn=attn).eval()
    batch = clm_batch(G=4)
    for j in (1, 2, 3):
        with torch.no_grad():
            stock = truncated_stock(model, j)(input_ids=batch["input_ids"]).logits
            path = model.exit_path(j)
            mine = path.logits(path.hidden(batch))
        assert torch.equal(mine, stock), (fam, attn, j)
    assert not torch.equal(mine, model.exit_path(1).logits(model.exit_path(1).hidden(batch)))


@pytest.mark.parametrize("fam", FAMILIES)
def test_training_forward_is_the_stock_causal_lm_loss(fam):
    model = tiny_decoder(fam, dropout=0.0).eval()
    batch = clm_batch(G=5, seed=3)
    with torch.no_grad():
        out = model(**batch)
        stock = model.hf(input_ids=batch["input_ids"], labels=batch["input_ids"])  # transformers shifts itself
    assert out["loss_tokens"].item() == 5 * 31  # T - 1 targets per row
    torch.testing.assert_close(out["loss"], stock.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out["loss_sum"] / out["loss_tokens"], out["loss"])
    # exact per-row losses equal the exit at block L
    torch.testing.assert_close(out["per_seq_loss"], exit_scores(model.exit_path(model.num_layers), batch, "loss"),
                               rtol=1e-6, atol=1e-6)
    predicted = stock.logits[:, :-1].argmax(-1) == batch["input_ids"][:, 1:]
    assert out["correct"].item() == predicted.sum().item()
    assert set(model.metrics()) == {"lm_loss", "lm_acc", "lm_ppl"}


@pytest.mark.parametrize("fam", FAMILIES)
def test_sdpa_blocks_get_no_mask_and_match_eager(fam):
    sdpa, eager = tiny_decoder(fam, dropout=0.0, attn="sdpa").eval(), tiny_decoder(fam, dropout=0.0, attn="eager").eval()
    hidden = torch.zeros(2, 8, 32)
    assert causal_mask(sdpa.config, hidden) is None  # SDPA's causal kernel: nothing built, nothing read
    assert causal_mask(eager.config, hidden) is not None
    batch = clm_batch(G=3)
    with torch.no_grad():
        torch.testing.assert_close(sdpa(**batch)["loss"], eager(**batch)["loss"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fam", FAMILIES)
def test_replica_has_the_same_structure_and_scores_alike(fam):
    model = tiny_decoder(fam).eval()
    live = model.exit_path(2)
    replica = live.replicate("cpu", torch.float32)
    assert [p.shape for p in replica.parameters()] == [p.shape for p in live.parameters()]
    assert not {id(p) for p in replica.parameters()} & {id(p) for p in live.parameters()}
    tied = model.config.tie_word_embeddings
    assert (replica.head.weight is replica.embed_modules[0].weight) == tied
    with torch.no_grad():
        for s, d in zip(live.parameters(), replica.parameters(), strict=True):
            d.copy_(s)
    batch = clm_batch(G=6)
    assert torch.equal(exit_scores(replica, batch, "entropy"), exit_scores(live, batch, "entropy"))


@pytest.mark.parametrize("fam", FAMILIES)
def test_from_state_rebuilds_the_stock_model(fam):
    model = tiny_decoder(fam)
    state = {f"hf.{k}": v for k, v in model.hf.state_dict().items()}
    if model.config.tie_word_embeddings:
        del state["hf.lm_head.weight"]  # ZeRO stores a shared tensor once
    stock = family(fam).from_state(state, model.export_config())
    assert type(stock) is type(model.hf)
    for name, tensor in model.hf.state_dict().items():
        assert torch.equal(stock.state_dict()[name], tensor), name
    with pytest.raises(ModelError, match="does not match"):
        family(fam).from_state({"hf.nonsense": torch.zeros(1)}, model.export_config())


def test_gpt2_125m_flops():
    """GPT-2 small at T = 1024: block 8h^2 + 4hi + 4Th per position, head 2hV per position."""
    model = build_model(ModelConfig(family="gpt2", preset="125m"),
                        DataFacts(vocab_size=50257, seq_len=1024, objective="clm", pad_id=50256, eos_id=50256))
    f = model.flops(1024)
    h, i, T, V = 768, 3072, 1024, 50257
    assert f.layers == 12 and f.block == T * (8 * h * h + 4 * h * i + 4 * T * h) and f.head == T * 2 * h * V
    assert f.forward() == pytest.approx(292e9, rel=0.01)
    assert f.scoring(1) == pytest.approx(96.7e9, rel=0.01)  # the LM head is 4/5 of an exit-1 score


def test_llama_flops_count_grouped_query_attention():
    model = tiny_decoder("llama")
    h, i, h_kv, T = 32, 64, 16, 32  # 2 query heads of 16, 1 key/value head
    assert model.flops(T).block == T * (4 * h * h + 4 * h * h_kv + 6 * h * i + 4 * T * h)


def test_errors_name_the_problem():
    data = DataFacts(vocab_size=VOCAB, seq_len=32, objective="mlm_packed", pad_id=0)
    with pytest.raises(ModelError, match="model.family gpt2 trains on data prepared with --objective clm"):
        build_model(ModelConfig(family="gpt2"), data)
    with pytest.raises(ConfigError, match=r"model.preset: 'base' is not one of tiny, 125m, 350m, 1b \(the llama"):
        load_config(None, ["model.family=llama", "model.preset=base"])
    assert load_config(None, ["model.family=gpt2", "model.preset=1.5b"]).model.preset == "1.5b"
    clm = DataFacts(vocab_size=VOCAB, seq_len=32, objective="clm", pad_id=0)
    with pytest.raises(ModelError, match="hidden_size 100 is not a multiple of model.num_heads 3"):
        build_model(ModelConfig(family="gpt2", hidden_size=100, num_heads=3), clm)
    with pytest.raises(ModelError, match="num_heads 4 is not a multiple of model.num_kv_heads 3"):
        build_model(ModelConfig(family="llama", num_heads=4, num_kv_heads=3), clm)


def test_init_from_a_saved_checkpoint(tmp_path):
    model = tiny_decoder("llama", dropout=0.0)
    model.hf.save_pretrained(tmp_path)
    cfg = ModelConfig(family="llama", init_from=str(tmp_path), dropout=0.0)
    again = build_model(cfg, DataFacts(vocab_size=VOCAB, seq_len=32, objective="clm", pad_id=0, eos_id=0))
    for (n, p), q in zip(model.named_parameters(), again.parameters(), strict=True):
        assert torch.equal(p, q), n
    with pytest.raises(ModelError, match="has a vocabulary of 120 tokens but the data's tokenizer has 500"):
        build_model(cfg, DataFacts(vocab_size=500, seq_len=32, objective="clm", pad_id=0))


class OpCounter(TorchDispatchMode):
    """Records the names of the aten ops that run inside it."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("fam", FAMILIES)
def test_chunked_head_loss_equals_the_whole_batch_and_saves_no_full_logits(fam):
    """model.loss_chunk: the same loss, metrics and gradients as the (G, T, V) computation (a chunk that
    does not divide G x T), no tensor of G x T x V elements is kept for the backward, and the backward's
    recompute of the head does not recompute the accuracy metric."""
    whole = tiny_decoder(fam, dropout=0.0)
    chunked = copy.deepcopy(whole)
    chunked.loss_chunk = 7
    batch = clm_batch(G=5, seed=4)
    full = 5 * 32 * VOCAB

    def run(model):
        sizes = []

        def keep(t):
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            out = model(**batch)
        with OpCounter() as ops:
            out["loss"].backward()
        return out, max(sizes), {n: p.grad for n, p in model.named_parameters()}, ops.seen

    a, a_max, a_grads, _ = run(whole)
    b, b_max, b_grads, b_ops = run(chunked)
    assert a_max >= full > b_max
    assert "aten.mm.default" in b_ops and "aten.argmax.default" not in b_ops  # the recompute stops before the metric
    for key in ("loss", "loss_sum", "per_seq_loss"):
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    assert b["correct"].item() == a["correct"].item() and b["loss_tokens"].item() == a["loss_tokens"].item()
    for name, grad in a_grads.items():
        torch.testing.assert_close(b_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_loss_chunk_is_for_decoders():
    with pytest.raises(ConfigError, match="model.loss_chunk: decoders only"):
        load_config(None, ["model.loss_chunk=1024"])
    assert load_config(None, ["model.family=llama", "model.loss_chunk=1024"]).model.loss_chunk == 1024
