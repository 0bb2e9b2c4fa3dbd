"""Shared test setup: Triton runs under its CPU interpreter when no GPU is present."""

import logging
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # torch's analysis of which tensors a user Triton kernel writes compiles the kernel for
    # the active GPU; without one it warns at every traced launch and assumes all are
    # written (correct, only slower). CPU only: on CUDA the warning would mean something.
    logging.getLogger("torch._higher_order_ops.triton_kernel_wrap").setLevel(logging.ERROR)
