"""Idle OpenMP threads sleep instead of spinning: every entry point imports this module first.

    import chexnet.idle_threads  # noqa: F401  (the first import of a script or notebook)

PyTorch's CPU kernels run on an OpenMP thread pool. Between two parallel regions its idle
threads spin, waiting for work, unless `OMP_WAIT_POLICY=PASSIVE`. On a machine whose cores are
shared (Colab's 2 cores, a laptop with a browser open, CI, a DataLoader's workers beside the
main process) the spinning threads take the cores from the ones with work: measured on 2 cores
beside one CPU-bound process, `predict.py` predicted about 13x slower (4.4x as a whole command,
start-up included) and a training step 10-30x slower (BENCHMARKS.md, "Idle threads").

The OpenMP runtime reads the variable once, when torch loads it, so this must run before the
first `import torch` of the process; it also reaches every subprocess (loader workers, torchrun).
A policy the user set explicitly (`OMP_WAIT_POLICY=ACTIVE` for a dedicated benchmark machine)
wins.

This is the one module of the package that changes the environment when imported: only entry
points (scripts, notebooks, the test suite's conftest.py) import it, never the library.
"""
import os

POLICY = "PASSIVE"

os.environ.setdefault("OMP_WAIT_POLICY", POLICY)
