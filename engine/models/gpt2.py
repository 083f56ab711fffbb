"""GPT-2 (`transformers` ``GPT2LMHeadModel``) as a SIFT model: learned positions, tied LM head.

The early exit at block j: token + position embeddings (and their dropout, off while scoring), blocks
1..j, the final LayerNorm ``ln_f`` and the tied LM head. See decoder.py for what all decoders share.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.models.gpt2.modeling_gpt2 import GPT2Block

from engine.config import ModelConfig
from engine.models.base import BlockLinear, DataFacts
from engine.models.decoder import (
    DECODER_FLOP_FORMULA,
    DecoderExit,
    SiftDecoder,
    causal_mask,
    check_heads,
    check_objective,
    load_pretrained,
    rebuild,
    special_token_ids,
)
from engine.models.presets import size as preset_size

FLOP_FORMULA = DECODER_FLOP_FORMULA
"""The family's FLOP model in one line (for benchmark records)."""


class GPT2Exit(DecoderExit):
    def embed(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        wte, wpe, drop = self.embed_modules
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        hidden = drop(wte(input_ids) + wpe(positions))
        return hidden, {"attention_mask": causal_mask(self.config, hidden)}

    def fresh(self) -> GPT2Exit:
        c = self.config
        wte, wpe = nn.Embedding(c.vocab_size, c.n_embd), nn.Embedding(c.n_positions, c.n_embd)
        head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        head.weight = wte.weight  # GPT-2's tie
        layers = [GPT2Block(c, layer_idx=i) for i in range(len(self.layers))]
        return GPT2Exit(c, [wte, wpe, nn.Dropout(c.embd_pdrop)], layers, nn.LayerNorm(c.n_embd, eps=c.layer_norm_epsilon),
                        head)


class SiftGPT2(SiftDecoder):
    family = "gpt2"
    # VCAS samples these transformers Conv1Ds (weights stored (in, out)). The fused query-key-value
    # projection carries keys and values, which attention mixes across positions: not token-local.
    block_linears = (
        BlockLinear("attn.c_attn", token_local=False),
        BlockLinear("attn.c_proj", token_local=True),
        BlockLinear("mlp.c_fc", token_local=True),
        BlockLinear("mlp.c_proj", token_local=True),
    )

    def blocks(self) -> list[nn.Module]:
        return list(self.hf.transformer.h)

    def exit_path(self, exit_layer: int) -> GPT2Exit:
        t = self.hf.transformer
        return GPT2Exit(self.config, [t.wte, t.wpe, t.drop], list(t.h[:exit_layer]), t.ln_f, self.hf.lm_head)

    def block_flops(self) -> float:
        """Per position: Q, K, V and output projections 4 x 2h^2, MLP up and down 2 x 2hi."""
        c = self.config
        h, i = c.n_embd, c.n_inner or 4 * c.n_embd
        return 8 * h * h + 4 * h * i


def hf_config(cfg: ModelConfig, data: DataFacts) -> GPT2Config:
    s = preset_size("gpt2", cfg.preset)
    check_heads(cfg.hidden_size or s.hidden_size, cfg.num_heads or s.num_heads)
    return GPT2Config(
        vocab_size=data.vocab_size, n_positions=max(1024, data.seq_len), n_embd=cfg.hidden_size or s.hidden_size,
        n_layer=cfg.num_layers or s.num_layers, n_head=cfg.num_heads or s.num_heads,
        n_inner=cfg.intermediate_size or s.intermediate_size, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout, attn_implementation=cfg.attn_implementation, **special_token_ids(data),
    )


def build(cfg: ModelConfig, data: DataFacts) -> SiftGPT2:
    """Random init from a preset (seed the global RNG first), or a local HF checkpoint (``init_from``)."""
    check_objective("gpt2", data)
    if cfg.init_from is None:
        return SiftGPT2(GPT2LMHeadModel(hf_config(cfg, data)), loss_chunk=cfg.loss_chunk)
    hf = load_pretrained(GPT2LMHeadModel, cfg, data, "n_positions", resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
                         attn_pdrop=cfg.dropout)
    return SiftGPT2(hf, loss_chunk=cfg.loss_chunk)


def from_state(state: dict[str, torch.Tensor], spec: dict[str, Any]) -> GPT2LMHeadModel:
    return rebuild(GPT2LMHeadModel, GPT2Config, state, spec)
