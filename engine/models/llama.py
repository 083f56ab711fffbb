"""Llama (`transformers` ``LlamaForCausalLM``) as a SIFT model: rotary positions, RMSNorm, SwiGLU, GQA.

The early exit at block j: token embeddings and the rotary position embeddings (cos and sin, computed
once per forward as the stock model does), blocks 1..j, the final RMSNorm and the model's LM head (tied
to the embeddings or not, as the preset or checkpoint says). See decoder.py for what decoders share.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

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


class LlamaExit(DecoderExit):
    def embed(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        tokens, rotary = self.embed_modules
        hidden = tokens(input_ids)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        return hidden, {"attention_mask": causal_mask(self.config, hidden), "position_ids": positions,
                        "position_embeddings": rotary(hidden, position_ids=positions)}

    def fresh(self) -> LlamaExit:
        c = self.config
        tokens = nn.Embedding(c.vocab_size, c.hidden_size, c.pad_token_id)
        head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        if c.tie_word_embeddings:
            head.weight = tokens.weight
        layers = [LlamaDecoderLayer(c, layer_idx=i) for i in range(len(self.layers))]
        return LlamaExit(c, [tokens, LlamaRotaryEmbedding(c)], layers, LlamaRMSNorm(c.hidden_size, eps=c.rms_norm_eps),
                         head)


class SiftLlama(SiftDecoder):
    family = "llama"
    # VCAS samples these (every position carries a target, so there is no last-block saving).
    block_linears = (
        BlockLinear("self_attn.q_proj", token_local=True),
        BlockLinear("self_attn.k_proj", token_local=False),
        BlockLinear("self_attn.v_proj", token_local=False),
        BlockLinear("self_attn.o_proj", token_local=True),
        BlockLinear("mlp.gate_proj", token_local=True),
        BlockLinear("mlp.up_proj", token_local=True),
        BlockLinear("mlp.down_proj", token_local=True),
    )

    def blocks(self) -> list[nn.Module]:
        return list(self.hf.model.layers)

    def exit_path(self, exit_layer: int) -> LlamaExit:
        m = self.hf.model
        return LlamaExit(self.config, [m.embed_tokens, m.rotary_emb], list(m.layers[:exit_layer]), m.norm,
                         self.hf.lm_head)

    def block_flops(self) -> float:
        """Per position: Q and output projections 2 x 2h^2, K and V 2 x 2 h h_kv (grouped-query
        attention: h_kv = kv heads x head dim), the gated MLP 3 x 2hi."""
        c = self.config
        h, i = c.hidden_size, c.intermediate_size
        head_dim = getattr(c, "head_dim", None) or h // c.num_attention_heads
        h_kv = c.num_key_value_heads * head_dim
        return 4 * h * h + 4 * h * h_kv + 6 * h * i


def hf_config(cfg: ModelConfig, data: DataFacts) -> LlamaConfig:
    s = preset_size("llama", cfg.preset)
    heads = cfg.num_heads or s.num_heads
    kv_heads = cfg.num_kv_heads or s.num_kv_heads or heads
    check_heads(cfg.hidden_size or s.hidden_size, heads, kv_heads)
    return LlamaConfig(
        vocab_size=data.vocab_size, hidden_size=cfg.hidden_size or s.hidden_size,
        intermediate_size=cfg.intermediate_size or s.intermediate_size, num_hidden_layers=cfg.num_layers or s.num_layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max(2048, data.seq_len), tie_word_embeddings=s.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": s.rope_theta}, attention_dropout=cfg.dropout,
        attn_implementation=cfg.attn_implementation, **special_token_ids(data),
    )


def build(cfg: ModelConfig, data: DataFacts) -> SiftLlama:
    """Random init from a preset (seed the global RNG first), or a local HF checkpoint (``init_from``)."""
    check_objective("llama", data)
    if cfg.init_from is None:
        return SiftLlama(LlamaForCausalLM(hf_config(cfg, data)), loss_chunk=cfg.loss_chunk)
    hf = load_pretrained(LlamaForCausalLM, cfg, data, "max_position_embeddings", attention_dropout=cfg.dropout)
    return SiftLlama(hf, loss_chunk=cfg.loss_chunk)


def from_state(state: dict[str, torch.Tensor], spec: dict[str, Any]) -> LlamaForCausalLM:
    return rebuild(LlamaForCausalLM, LlamaConfig, state, spec)
