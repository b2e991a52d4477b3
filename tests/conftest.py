"""Test-session setup.

Without CUDA, the Triton kernels run under Triton's interpreter; it must be switched on before
anything imports triton.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
