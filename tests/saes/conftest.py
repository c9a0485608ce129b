"""SAE unit tests use tiny matrices: one thread is faster than two (no spin-waiting), and far faster when the
machine's cores are shared."""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
