"""Fused Triton kernels (reflexflow.kernels). See kernels/README.md for the plan."""
