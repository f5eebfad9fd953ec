"""Experiments composed from training and evaluation: the KAMIM hyper-parameter sweep.

* :mod:`kamim.experiments.sweep` — ``sweep(cfg, data, out_dir, ...)``, the detector x weight patch
  size x temperature grid, one pretraining run each, optionally evaluated (k-NN / linear probe);
* :mod:`kamim.experiments.sweep_grid` — the paper's grid values (torch-free, for ``--help``).

This layer sits above :mod:`kamim.engine` and :mod:`kamim.eval` (it may import both; neither imports
it) and below the CLIs. Nothing is imported here, so ``kamim sweep --help`` stays torch-free.
"""
