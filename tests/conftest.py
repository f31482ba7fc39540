import pytest
import torch


@pytest.fixture
def float64():
    """Run a test with float64 as the default dtype (hand-computed references need it)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture
def one_thread():
    """One intra-op thread: the machines that run the suite are small and shared, and several
    threads on ResNet-size convolutions there run many times slower than one."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
