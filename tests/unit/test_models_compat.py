"""first_tensor: a layer's hidden states whatever the installed transformers returns."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.bert.modeling_bert import BertLayer

from engine.models.compat import first_tensor


def test_first_tensor_accepts_every_shape_of_output():
    h = torch.randn(2, 3, 4)
    assert first_tensor(h) is h
    assert first_tensor((h, None)) is h and first_tensor([h, torch.zeros(1)]) is h
    assert first_tensor(BaseModelOutput(last_hidden_state=h)) is h
    for bad in ((None, h), (), "text", None, {"a": h}):
        with pytest.raises(TypeError, match="expected a tensor"):
            first_tensor(bad)


def test_the_installed_bert_layer_output_goes_through():
    cfg = BertConfig(hidden_size=16, num_attention_heads=2, intermediate_size=32, attn_implementation="sdpa")
    layer = BertLayer(cfg, layer_idx=0).eval()
    x = torch.randn(2, 5, 16)
    out = first_tensor(layer(x, None))
    assert out.shape == x.shape
