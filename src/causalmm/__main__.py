"""`python -m causalmm` (and `accelerate launch -m causalmm`) runs the CLI."""

from .cli import main

main()
