"""`python -m app.cli`: what `qlora serve` starts its local worker with, and what the tests run."""

from app.cli import main

main()
