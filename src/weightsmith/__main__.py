"""``python -m weightsmith`` (e.g. under ``torchrun``) runs the command-line tool."""

from .cli import main

main()
