"""Building blocks of the training system: stages, optimizer groups and schedule, EMA, checkpoints."""
