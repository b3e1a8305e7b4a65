"""pytest-benchmark suites: ``pytest bench/ --benchmark-only`` (see bench/README in the
project README). Every benchmark compares backends and baselines on the same inputs; the
``group`` of each is the op and size, so ``--benchmark-compare`` / ``--benchmark-histogram``
line the implementations up side by side."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(torch.get_num_threads())   # as configured (OMP_NUM_THREADS)
    torch.manual_seed(0)
