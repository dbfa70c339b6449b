"""One torch thread for every vision test (their models are small; see tests/conftest.py)."""

import pytest


@pytest.fixture(autouse=True)
def vision_one_thread(one_torch_thread):
    yield
