"""One script per question: mask statistics, loaders, kernels, training step, the paper's claims."""
