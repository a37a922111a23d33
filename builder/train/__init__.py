"""Training: the loop, its optimizers and schedules, weight averaging, late QAT, compilation, and
checkpoints brought in from record code."""
