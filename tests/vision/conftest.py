"""One torch thread for the vision tests: their models are small, and on a shared machine two spinning OpenMP
threads per process cost far more than they give (measured here: a 10x slower training step under load)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
