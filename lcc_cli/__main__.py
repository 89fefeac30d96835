"""`python -m lcc_cli` runs the CLI."""

from .cli import main

main()
