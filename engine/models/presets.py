"""BERT sizes, from the 2-layer miniatures used in CPU tests to BERT-large."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BertSize:
    num_layers: int
    hidden_size: int
    num_heads: int
    intermediate_size: int


PRESETS: dict[str, BertSize] = {
    "tiny": BertSize(2, 128, 2, 512),
    "mini": BertSize(4, 256, 4, 1024),
    "small": BertSize(4, 512, 8, 2048),
    "medium": BertSize(8, 512, 8, 2048),
    "base": BertSize(12, 768, 12, 3072),
    "large": BertSize(24, 1024, 16, 4096),
}
