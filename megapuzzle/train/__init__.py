"""Training utilities shared by train-parent, BLD and GKD: schedule, resumable state, logging."""
