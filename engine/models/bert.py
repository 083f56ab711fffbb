"""BERT from `transformers` with the MLM head applied only at the masked positions.

The stock head computes T x V logits per sequence (512 x 30,522 for BERT-base, about a fifth of its
compute); gathering the G x P masked hidden states first makes that cost negligible. The same gather
serves the early exit: embeddings + the first j encoder layers + the model's own MLM head.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertForMaskedLM, BertForPreTraining
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.bert.modeling_bert import BertEmbeddings, BertLayer, BertLMPredictionHead

from engine.config import ModelConfig
from engine.models.presets import PRESETS
from engine.scoring import per_sequence_mean, token_cross_entropy


class ModelError(ValueError):
    """A model setting that does not fit the data (vocabulary, sequence length, checkpoint)."""


def hf_config(cfg: ModelConfig, *, vocab_size: int, seq_len: int, pad_id: int) -> BertConfig:
    size = PRESETS[cfg.preset]
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


def _gather_positions(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(G, T, H) hidden states, (G, P) positions -> (G, P, H)."""
    return hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


@dataclass
class ExitPath:
    """The modules an early exit at layer j runs: embeddings, encoder layers 1..j, the MLM head.

    Either views of the live model (ZeRO 0-2) or a replicated copy (ZeRO-3, see ``replicate``).
    """

    config: BertConfig
    embeddings: nn.Module
    layers: list[nn.Module]
    head: nn.Module

    def modules(self) -> list[nn.Module]:
        return [self.embeddings, *self.layers, self.head]

    def parameters(self) -> list[nn.Parameter]:
        """Each parameter once (the head's decoder weight is the word-embedding matrix)."""
        seen: dict[int, nn.Parameter] = {}
        for m in self.modules():
            for p in m.parameters():
                seen.setdefault(id(p), p)
        return list(seen.values())

    def masked_hidden(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(G, P, H) layer j's hidden states at the masked positions."""
        hidden = self.embeddings(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"])
        mask = create_bidirectional_mask(
            config=self.config, inputs_embeds=hidden, attention_mask=batch["attention_mask"]
        )
        for layer in self.layers:
            hidden = layer(hidden, mask)
        return _gather_positions(hidden, batch["mlm_positions"])

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(G, P, V) MLM logits of layer j's hidden states at the masked positions."""
        return self.head(self.masked_hidden(batch))

    def replicate(self, device: torch.device | str, dtype: torch.dtype) -> ExitPath:
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
        replica = ExitPath(cfg, emb, layers, head)
        for m in replica.modules():
            m.to(device=device, dtype=dtype).requires_grad_(False)
        return replica


class SiftBert(nn.Module):
    """BERT pretraining model whose forward takes a batch dict (see data_pipeline/batch.py).

    ``hf`` is a stock ``BertForPreTraining`` (pairs with NSP) or ``BertForMaskedLM`` (packed MLM-only
    data; it has no pooler, so no parameter goes unused), so export is a plain ``save_pretrained``.
    """

    def __init__(self, hf: BertForPreTraining | BertForMaskedLM):
        super().__init__()
        self.hf = hf
        self.use_nsp = isinstance(hf, BertForPreTraining)

    @property
    def config(self) -> BertConfig:
        return self.hf.config

    @property
    def num_layers(self) -> int:
        return self.hf.config.num_hidden_layers

    def exit_path(self, exit_layer: int) -> ExitPath:
        bert = self.hf.bert
        return ExitPath(
            self.hf.config, bert.embeddings, list(bert.encoder.layer[:exit_layer]), self.hf.cls.predictions
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        mlm_positions: torch.Tensor,
        mlm_labels: torch.Tensor,
        nsp_labels: torch.Tensor,
        sample_ids: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Training loss = token-mean MLM cross-entropy (+ mean NSP cross-entropy for pairs), on this
        device's rows. ``mlm_sum`` lets the schedule normalise by the global token count instead.

        Also returns detached statistics: ``mlm_per_seq`` (G,) mean masked-token CE per sequence
        (0 where a row has no masked token), correct/count sums for accuracies.
        """
        out = self.hf.bert(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, return_dict=True
        )
        logits = self.hf.cls.predictions(_gather_positions(out.last_hidden_state, mlm_positions))
        ce = token_cross_entropy(logits, mlm_labels)  # (G, P), 0 at unused slots
        valid = mlm_labels >= 0
        count = valid.sum()
        mlm_sum = ce.sum()
        mlm_loss = mlm_sum / count.clamp(min=1)
        result = {
            "mlm_sum": mlm_sum,
            "mlm_loss": mlm_loss,
            "mlm_per_seq": per_sequence_mean(ce.detach(), valid),
            "mlm_correct": ((logits.detach().argmax(-1) == mlm_labels) & valid).sum(),
            "mlm_count": count,
        }
        loss = mlm_loss
        if self.use_nsp:
            nsp_logits = self.hf.cls.seq_relationship(out.pooler_output)
            nsp_loss = F.cross_entropy(nsp_logits.float(), nsp_labels, ignore_index=-100)
            loss = loss + nsp_loss
            result["nsp_loss"] = nsp_loss
            result["nsp_correct"] = (nsp_logits.detach().argmax(-1) == nsp_labels).sum()
            result["nsp_count"] = (nsp_labels >= 0).sum()
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
