"""Test-session setup.

Without CUDA, the Triton kernels run under Triton's interpreter; it must be switched on before
anything imports triton.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def one_thread():
    """Tiny shapes: intra-op threads only add contention on a 2-core runner; restored afterwards.

    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
