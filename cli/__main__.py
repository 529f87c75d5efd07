"""`python -m simmim.cli ...`: the same command as the `simmim` console script."""
from .main import main

main()
