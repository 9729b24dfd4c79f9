"""Training: the one jitted train step (`step`), the loop with exact resume (`runner`), the
losses, the task-weighting strategies and MGDA solvers, and the gradient prior with its surrogate."""
