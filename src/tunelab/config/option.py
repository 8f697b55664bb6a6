"""`option()`: how every config key is declared (its default, help line and allowed range)."""

from dataclasses import field
from typing import Any


def option(default: Any, help: str, *, minimum: float | None = None, maximum: float | None = None,
           exclusive_minimum: bool = False) -> Any:
    """A config key: its default, one line of help, and the numeric range it accepts."""
    meta = {"help": help, "minimum": minimum, "maximum": maximum, "exclusive_minimum": exclusive_minimum}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)
