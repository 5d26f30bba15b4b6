"""Experiment tooling above the engine: the command line, config overrides, sweeps, results and benchmarks.

`python -m transformer.experiment` (or `launch.py`, which calls it) is the command line."""
