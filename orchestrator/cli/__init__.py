"""``hkd``: the command line. ``main`` (the console script's entry point, ``orchestrator.cli:main``) lives in
``commands``: a parser per command, one call of ``orchestrator.api``, then ``output`` prints."""

from orchestrator.cli.commands import main

__all__ = ["main"]
