"""Root conftest: every test starts from the same random state, so no test depends on the order they run in."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _fixed_seed():
    torch.manual_seed(0)
