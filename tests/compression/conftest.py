"""Shared fixtures for the compression tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    """Run on one intra-op thread: these tests use tiny tensors, where a second thread only
    adds synchronisation, and on a busy 2-core machine a spinning thread pool slowed the
    batched double backward by 10-100x (measured)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
