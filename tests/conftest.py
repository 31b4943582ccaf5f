import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _single_thread():
    # The test networks are tiny: one intra-op thread is faster, and it avoids OpenMP spin-wait
    # slowdowns when another process shares the 2 CI cores.
    torch.set_num_threads(1)
    yield
