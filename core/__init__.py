"""What every package shares and that is not about data: the user-error family (errors.py), atomic
file output (io.py), the one seed derivation (seeding.py) and the vocabulary of option ranges
(rules.py). The bottom of the dependency graph: it imports nothing of the project."""
