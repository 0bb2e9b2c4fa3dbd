"""reflexflow's benchmarks (a source checkout only; not part of the installed package).

machinery/: the training-step benchmark behind ``reflexflow bench`` (step.py: FLOP ideal,
timing; report.py: environment, tables, JSON; run.py: the command). suites/: the loss,
rollout and stable-target suites it also runs. bench_*.py: the pytest-benchmark files
and scripts; results/: committed result files; README.md: how to run, and the figures.
The models they time are in reflexflow.demo.toy_models.
"""
