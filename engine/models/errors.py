"""The model adapters' error type (its own module, so config and registry code can raise it cheaply)."""

from __future__ import annotations

from sift_common.errors import SiftError


class ModelError(SiftError, ValueError):
    """A model setting that does not fit the data (vocabulary, sequence length, checkpoint)."""
