"""Fixtures shared by tests/engine and tests/orchestrator."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture()
def one_torch_thread() -> Iterator[None]:
    """One torch thread for the test, restored after: the machines tests run on are shared, one thread is
    what a one-CPU trial gets, and it keeps in-process float results reproducible."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
