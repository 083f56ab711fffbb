"""BERT from `transformers` with the MLM head applied only at the masked positions.

The stock head computes T x V logits per sequence (512 x 30,522 for BERT-base, about a fifth of its
compute); gathering the G x P masked hidden states first makes that cost negligible. The same gather
serves the early exit: embeddings + the first j encoder layers + the model's own MLM head.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertForMaskedLM, BertForPreTraining
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.bert.modeling_bert import BertEmbeddings, BertLayer, BertLMPredictionHead

from engine.config import ModelConfig
from engine.models.base import (
    Batch,
    BlockLinear,
    DataFacts,
    FlopCounts,
    Mean,
    Metric,
    Ratio,
    SiftModel,
    token_sums,
)
from engine.models.compat import first_tensor
from engine.models.errors import ModelError
from engine.models.presets import size as preset_size
from engine.scoring import per_sequence_mean, token_cross_entropy


def hf_config(cfg: ModelConfig, *, vocab_size: int, seq_len: int, pad_id: int) -> BertConfig:
    size = preset_size("bert", cfg.preset)
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size or size.hidden_size,
        num_hidden_layers=cfg.num_layers or size.num_layers,
        num_attention_heads=cfg.num_heads or size.num_heads,
        intermediate_size=cfg.intermediate_size or size.intermediate_size,
        hidden_act="gelu",
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
        max_position_embeddings=max(512, seq_len),
        type_vocab_size=2,
        pad_token_id=pad_id,
        attn_implementation=cfg.attn_implementation,
    )


def attention_mask_for(config: BertConfig, attention_mask: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor | None:
    """The mask the encoder layers get. Under SDPA: a (G, 1, 1, T) boolean key mask, broadcast over the
    queries, built without a host sync (transformers' own path reads ``padding_mask.all()`` to the host to
    decide whether a mask is needed, and materialises (G, 1, T, T)). Other attention implementations get
    transformers' mask."""
    if config._attn_implementation == "sdpa":
        return attention_mask.bool()[:, None, None, :]
    return create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=attention_mask)


def _gather_positions(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(G, T, H) hidden states, (G, P) positions -> (G, P, H)."""
    return hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


def _unique_parameters(modules: list[nn.Module]) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for m in modules:
        for p in m.parameters():
            seen.setdefault(id(p), p)
    return list(seen.values())


class BertExit:
    """The early exit at layer j (an ``ExitPath``): embeddings, encoder layers 1..j, the MLM head,
    scored at the masked positions. Views of the live model, or a replica (``replicate``)."""

    def __init__(self, config: BertConfig, embeddings: nn.Module, layers: list[nn.Module], head: nn.Module):
        self.config, self.embeddings, self.layers, self.head = config, embeddings, layers, head
        self.vocab_size = config.vocab_size

    def modules(self) -> list[nn.Module]:
        return [self.embeddings, *self.layers, self.head]

    def parameters(self) -> list[nn.Parameter]:
        """Each parameter once (the head's decoder weight is the word-embedding matrix)."""
        return _unique_parameters(self.modules())

    def hidden(self, batch: Batch) -> torch.Tensor:
        """(G, P, H) layer j's hidden states at the masked positions."""
        hidden = self.embeddings(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"])
        mask = attention_mask_for(self.config, batch["attention_mask"], hidden)
        for layer in self.layers:
            hidden = first_tensor(layer(hidden, mask))  # a tensor in transformers 5.x; tuples tolerated
        return _gather_positions(hidden, batch["mlm_positions"])

    def targets(self, batch: Batch) -> torch.Tensor:
        return batch["mlm_labels"]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)

    def replicate(self, device: torch.device | str, dtype: torch.dtype) -> BertExit:
        """A fresh, unshared copy of these modules' structure (weights filled by the caller).

        Used under ZeRO-3, where the live parameters are partitioned: the scorer reads this small
        replica, so it never runs a partial forward through DeepSpeed's hooked modules (their
        prefetch trace assumes full forwards) and can be read from a side stream.
        """
        cfg = self.config
        emb = BertEmbeddings(cfg)
        layers = [BertLayer(cfg, layer_idx=i) for i in range(len(self.layers))]
        head = BertLMPredictionHead(cfg)
        head.decoder.weight = emb.word_embeddings.weight  # the tie the HF model has
        head.decoder.bias = head.bias
        replica = BertExit(cfg, emb, layers, head)
        for m in replica.modules():
            m.to(device=device, dtype=dtype).requires_grad_(False)
        return replica


def flop_counts(config: BertConfig, seq_len: int, masked: int, nsp: bool) -> FlopCounts:
    """BERT's FLOPs per sequence of T = ``seq_len`` positions (padding included: the kernels run on it),
    hidden h, feed-forward width i, vocabulary V, P = ``masked`` head slots:

        encoder layer, per position:  8 h^2 + 4 h i + 4 T h
            (Q, K, V and output projections 4 x 2h^2; FFN up and down 2 x 2hi; scores QK^T and the
             weighted sum AV 2 x 2Th)
        MLM head, per masked slot:    2 h^2 + 2 h V          (transform dense + tied decoder)
        NSP (sentence pairs), per sequence: 2 h^2 + 4 h     (pooler + classifier)

    Left out (< 1% for BERT-base): embedding lookups, layer norms, softmax, GELU, biases, the loss.
    BERT-base at T = 512: training 3 x 100.3 = 301 GFLOP per sequence; exit-1 scoring 11.8 GFLOP.
    """
    h, i, T = config.hidden_size, config.intermediate_size, seq_len
    return FlopCounts(
        layers=config.num_hidden_layers,
        block=T * (8 * h * h + 4 * h * i + 4 * T * h),
        head=masked * (2 * h * h + 2 * h * config.vocab_size),
        extra=(2 * h * h + 4 * h) if nsp else 0.0,
    )


FLOP_FORMULA = ("training = 3 x forward; forward/seq = T L (8h^2 + 4hi + 4Th) + P (2h^2 + 2hV) + NSP (2h^2 + 4h); "
                "scoring/seq at exit j = T j (8h^2 + 4hi + 4Th) + P (2h^2 + 2hV); P = ceil(0.15 T) masked slots, "
                "T counts padding")
"""The FLOP model of ``flop_counts`` in one line (for benchmark records)."""


class SiftBert(SiftModel):
    """BERT pretraining model whose forward takes a batch dict (see data_pipeline/batch.py).

    ``hf`` is a stock ``BertForPreTraining`` (pairs with NSP) or ``BertForMaskedLM`` (packed MLM-only
    data; it has no pooler, so no parameter goes unused); export writes a ``BertForMaskedLM`` either way.
    """

    family = "bert"
    token_loss_name = "mlm"
    block_linears = (
        BlockLinear("attention.self.query", token_local=True),
        BlockLinear("attention.self.key", token_local=False),
        BlockLinear("attention.self.value", token_local=False),
        BlockLinear("attention.output.dense", token_local=True),
        BlockLinear("intermediate.dense", token_local=True),
        BlockLinear("output.dense", token_local=True),
    )

    def __init__(self, hf: BertForPreTraining | BertForMaskedLM):
        super().__init__()
        self.hf = hf
        self.use_nsp = isinstance(hf, BertForPreTraining)

    @property
    def config(self) -> BertConfig:
        return self.hf.config

    def blocks(self) -> list[nn.Module]:
        return list(self.hf.bert.encoder.layer)

    def exit_path(self, exit_layer: int) -> BertExit:
        bert = self.hf.bert
        return BertExit(self.config, bert.embeddings, list(bert.encoder.layer[:exit_layer]), self.hf.cls.predictions)

    def live_positions(self, batch: Batch) -> torch.Tensor:
        """The MLM head reads the masked positions, NSP reads [CLS] at 0 (kept for MLM-only data too: unused
        mask slots point there anyway)."""
        pos = batch["mlm_positions"]
        return torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)

    def metrics(self) -> dict[str, Metric]:
        out: dict[str, Metric] = {"mlm_loss": Ratio("loss_sum", "loss_tokens"),
                                  "mlm_acc": Ratio("correct", "loss_tokens")}
        if self.use_nsp:
            out |= {"nsp_loss": Mean("nsp_loss"), "nsp_acc": Ratio("nsp_correct", "nsp_count")}
        return out

    def flops(self, seq_len: int, mask_prob: float = 0.15) -> FlopCounts:
        from data_pipeline.batch import max_predictions

        return flop_counts(self.config, seq_len, max_predictions(seq_len, mask_prob), self.use_nsp)

    def export_config(self) -> dict[str, Any]:
        return {"family": self.family, "class": type(self.hf).__name__, "config": self.config.to_dict()}

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        mlm_positions: torch.Tensor,
        mlm_labels: torch.Tensor,
        nsp_labels: torch.Tensor,
        sample_ids: torch.Tensor | None = None,
        row_weights: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Training loss = token-mean MLM cross-entropy (+ mean NSP cross-entropy for pairs), on this
        device's rows, weighted by ``row_weights`` when given; the loss contract of engine/models/base.py,
        plus ``correct`` (masked tokens predicted right) and, for pairs, ``nsp_loss``, ``nsp_correct``,
        ``nsp_count``."""
        if self.config._attn_implementation == "sdpa":  # 4-D masks pass through transformers as they are
            attention_mask = attention_mask_for(self.config, attention_mask, None)
        out = self.hf.bert(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, return_dict=True
        )
        logits = self.hf.cls.predictions(_gather_positions(out.last_hidden_state, mlm_positions))
        ce = token_cross_entropy(logits, mlm_labels)  # (G, P), 0 at unused slots
        valid = mlm_labels >= 0
        loss_sum, count, correct = token_sums(ce, valid, logits.detach().argmax(-1) == mlm_labels, row_weights)
        result = {
            "loss_sum": loss_sum,
            "loss_tokens": count,
            "per_seq_loss": per_sequence_mean(ce.detach(), valid),
            "correct": correct,
        }
        loss = loss_sum / count.clamp(min=1)
        if self.use_nsp:
            nsp_logits = self.hf.cls.seq_relationship(out.pooler_output)
            nsp_hits = nsp_logits.detach().argmax(-1) == nsp_labels
            if row_weights is None:
                nsp_loss = F.cross_entropy(nsp_logits.float(), nsp_labels, ignore_index=-100)
                result["nsp_correct"] = nsp_hits.sum()
                result["nsp_count"] = (nsp_labels >= 0).sum()
            else:  # the weighted mean over the rows that have a label
                per_row = F.cross_entropy(nsp_logits.float(), nsp_labels, ignore_index=-100, reduction="none")
                weight = (row_weights * (nsp_labels >= 0)).sum()
                nsp_loss = (per_row * row_weights).sum() / weight
                result["nsp_correct"] = (nsp_hits * row_weights).sum()
                result["nsp_count"] = result["extra_weight"] = weight
            loss = loss + nsp_loss
            result["extra_loss"] = result["nsp_loss"] = nsp_loss
        result["loss"] = loss
        return result


def build_model(cfg: ModelConfig, *, vocab_size: int, seq_len: int, pad_id: int, use_nsp: bool) -> SiftBert:
    """Random init from a preset (seed the global RNG first), or a local HF checkpoint."""
    if cfg.init_from is None:
        config = hf_config(cfg, vocab_size=vocab_size, seq_len=seq_len, pad_id=pad_id)
        hf = BertForPreTraining(config) if use_nsp else BertForMaskedLM(config)
        return SiftBert(hf)
    path = Path(cfg.init_from)
    if not (path / "config.json").is_file():
        raise ModelError(f"model.init_from: {path} is not a Hugging Face checkpoint directory (no config.json)")
    cls = BertForPreTraining if use_nsp else BertForMaskedLM
    try:
        hf = cls.from_pretrained(
            path, local_files_only=True, attn_implementation=cfg.attn_implementation,
            hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
        )
    except (OSError, ValueError) as e:
        raise ModelError(f"model.init_from: cannot load {path}: {e}") from None
    if hf.config.vocab_size < vocab_size:
        raise ModelError(
            f"model.init_from: {path} has a vocabulary of {hf.config.vocab_size} tokens but the data's "
            f"tokenizer has {vocab_size}; prepare the data with that checkpoint's tokenizer"
        )
    if hf.config.max_position_embeddings < seq_len:
        raise ModelError(
            f"model.init_from: {path} supports sequences of {hf.config.max_position_embeddings} tokens, "
            f"the data has {seq_len}"
        )
    return SiftBert(hf)


# --------------------------------------------------------------------- the family's registry entry

OBJECTIVES = ("nsp_pairs", "mlm_packed")

# The MLM decoder shares the word-embedding matrix and its bias parameter; ZeRO checkpoints store each
# shared tensor once, under the first name.
TIED = {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}


def build(cfg: ModelConfig, data: DataFacts) -> SiftBert:
    if data.objective not in OBJECTIVES:
        raise ModelError(f"model.family bert trains on data prepared with --objective {' or '.join(OBJECTIVES)}, "
                         f"not {data.objective!r}")
    return build_model(cfg, vocab_size=data.vocab_size, seq_len=data.seq_len, pad_id=data.pad_id,
                       use_nsp=data.objective == "nsp_pairs")


NSP_ONLY = ("bert.pooler.", "cls.seq_relationship.")
"""Parameters only next-sentence prediction uses; the exported BertForMaskedLM has neither."""


def from_state(state: dict[str, torch.Tensor], spec: dict[str, Any], *,
               nsp_head: bool = False) -> BertForMaskedLM | BertForPreTraining:
    """The stock model holding ``state`` (the adapter's parameter names), checked against the class
    ``spec`` (``export_config()``) trained; ModelError naming the mismatch when they do not fit.

    A ``BertForMaskedLM``: a model trained with NSP loses its pooler and NSP head, which is what
    ``pipeline("fill-mask")`` and ``AutoModelForMaskedLM`` load, so loading reports no unused weights.
    ``nsp_head``: the trained class itself (to continue pre-training from it with ``model.init_from``)."""
    state = {k.removeprefix("hf."): v for k, v in state.items()}
    cls = {"BertForPreTraining": BertForPreTraining, "BertForMaskedLM": BertForMaskedLM}.get(spec["class"])
    if cls is None:
        raise ModelError(f"unknown BERT class {spec['class']!r} in the checkpoint record")
    config = BertConfig.from_dict(spec["config"])
    with torch.device("meta"):  # the trained class's parameter names, without allocating it
        expected = set(cls(config).state_dict())
    missing, unexpected = expected - set(state) - TIED, set(state) - expected
    if missing or unexpected:
        raise ModelError(f"the checkpoint does not match {spec['class']}: missing {sorted(missing)}, "
                         f"unexpected {sorted(unexpected)}")
    if nsp_head:
        model = cls(config)
        model.load_state_dict(state, strict=False)
    else:
        model = BertForMaskedLM(config)
        model.load_state_dict({k: v for k, v in state.items() if not k.startswith(NSP_ONLY)}, strict=False)
    model.tie_weights()
    return model
