"""The errors a user can fix by changing an option or an input file; the CLI prints them in one line (exit 2).

Kept free of heavy imports: the CLI imports this module before it has validated anything.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """Options that contradict each other, are out of range, or name something unknown."""


class DataError(ValueError):
    """Input data that cannot be used, with a message naming the file, row or column at fault."""


class RunDirectoryError(ValueError):
    """A run directory that lacks what a command needs (e.g. evaluated before export), naming the file."""
