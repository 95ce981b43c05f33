"""`python -m ferkit ...`: the same as the `ferkit` command, where no console script is installed."""

from ferkit.cli import main

main()
