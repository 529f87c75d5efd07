"""The `simmim` command, at the top of the dependency graph: the trainer's commands
(simmim.trainer.cli) plus `simmim bench NAME` (simmim.benchmarks.cli). Nothing imports it."""
