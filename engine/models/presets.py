"""Model sizes per family (``model.family`` / ``model.preset``): from the miniatures used in CPU tests
to the GPU sizes. The vocabulary and sequence length come from the data, so they are not part of a size."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ModelSize:
    num_layers: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    num_kv_heads: int | None = None
    """Llama: key/value heads (grouped-query attention); None: as many as query heads."""
    tie_embeddings: bool = True
    """Decoders: the LM head shares the token-embedding matrix (GPT-2 always; Llama-3.2-1B does)."""
    rope_theta: float = 10000.0
    """Llama: the rotary embeddings' base."""


BertSize = ModelSize  # the name BERT code and older plugins use

PRESETS: dict[str, ModelSize] = {
    "tiny": ModelSize(2, 128, 2, 512),
    "mini": ModelSize(4, 256, 4, 1024),
    "small": ModelSize(4, 512, 8, 2048),
    "medium": ModelSize(8, 512, 8, 2048),
    "base": ModelSize(12, 768, 12, 3072),
    "large": ModelSize(24, 1024, 16, 4096),
}
"""BERT sizes (``model.family: bert``)."""

GPT2_PRESETS: dict[str, ModelSize] = {
    "tiny": ModelSize(4, 128, 4, 512),  # CPU tests and demos
    "125m": ModelSize(12, 768, 12, 3072),  # GPT-2 small
    "350m": ModelSize(24, 1024, 16, 4096),  # GPT-2 medium
    "774m": ModelSize(36, 1280, 20, 5120),  # GPT-2 large
    "1.5b": ModelSize(48, 1600, 25, 6400),  # GPT-2 XL
}

LLAMA_PRESETS: dict[str, ModelSize] = {
    "tiny": ModelSize(4, 128, 4, 352, num_kv_heads=2, tie_embeddings=False),  # CPU tests and demos
    "125m": ModelSize(12, 768, 12, 2048, num_kv_heads=4, tie_embeddings=True),
    "350m": ModelSize(24, 1024, 16, 2816, num_kv_heads=8, tie_embeddings=True),
    # Llama-3.2-1B's shape (16 layers, GQA 32/8, SwiGLU 8192, tied embeddings, rope base 500K)
    "1b": ModelSize(16, 2048, 32, 8192, num_kv_heads=8, tie_embeddings=True, rope_theta=500000.0),
}

FAMILY_PRESETS: dict[str, dict[str, ModelSize]] = {"bert": PRESETS, "gpt2": GPT2_PRESETS, "llama": LLAMA_PRESETS}
"""Family -> its sizes; ``model.preset`` must name one of its family's (a plugin family may add its own)."""


def size(family: str, preset: str) -> ModelSize:
    """The preset ``preset`` of ``family`` (KeyError when either is unknown: config validation says which)."""
    return FAMILY_PRESETS[family][preset]


def model_layers(family: str, preset: str, num_layers: int | None = None) -> int:
    """Blocks of a model configured by family, preset and an optional ``model.num_layers`` override."""
    return num_layers or size(family, preset).num_layers
