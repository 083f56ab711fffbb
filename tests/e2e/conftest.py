"""Fixtures shared by the end-to-end modules."""

from __future__ import annotations

import pytest

from tests.runs import train


@pytest.fixture(scope="session")
def run_a(tiny_data, tmp_path_factory):
    """The reference: the tiny run's 20 uninterrupted steps, checkpoints at 10 and 20."""
    out = tmp_path_factory.mktemp("run-a")
    train(out, tiny_data)
    return out
