"""Benchmark machinery shared by ``benchmarks/`` (pytest-benchmark) and ``reflexflow bench``.

models.py: the small DiT/SiT-style transformer and UNet; step.py: the end-to-end
training-step benchmark and its FLOP ideal; report.py: environment, table and JSON;
suites.py: the loss / rollout benchmarks of other modules, found when installed.
"""
