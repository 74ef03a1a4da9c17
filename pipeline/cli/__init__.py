"""The ``studios`` command."""

from pipeline.cli.main import main

__all__ = ["main"]
