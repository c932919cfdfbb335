"""Evals: POPE and CHAIR scoring, the eval CLI, sweeps and the synthetic world."""
