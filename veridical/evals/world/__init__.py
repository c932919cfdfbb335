"""A small synthetic world whose tiny model hallucinates for a known reason (a planted co-occurrence
prior), so every method can be measured end to end on a CPU. See :mod:`veridical.evals.world.scenes`."""
