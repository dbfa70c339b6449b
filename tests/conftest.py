"""Fixtures every part of the suite may use."""

import pytest
import torch


@pytest.fixture
def one_torch_thread():
    """One torch thread for small models: on a shared 2-core machine, two spinning OpenMP threads per process cost
    far more than they give (measured here: a 10x slower training step under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
