"""Small shims over differences between `transformers` versions.

`BertLayer.forward` returns a tensor in the versions read so far (5.17, the GPU image's, and 5.24, the
one the tests install), but older releases returned a tuple (hidden_states, attentions...) and a later
one may again; callers that chain layers by hand take the hidden states with `first_tensor`.
"""

from __future__ import annotations

from typing import Any

import torch


def first_tensor(output: Any) -> torch.Tensor:
    """The hidden states of a layer's output: the tensor itself, or the first element of a tuple/list or
    of a `ModelOutput` (which indexes like a tuple)."""
    if isinstance(output, torch.Tensor):
        return output
    try:
        first = output[0]
    except (TypeError, IndexError, KeyError):
        first = None
    if isinstance(first, torch.Tensor):
        return first
    raise TypeError(f"expected a tensor or a sequence starting with one, got {type(output).__name__}")
