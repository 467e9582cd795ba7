"""The one console for people: stderr, so stdout carries only results (paths, --json)."""

from __future__ import annotations

import os

from rich.console import Console

# Rich honours NO_COLOR and drops styling when stderr is not a terminal.
console = Console(stderr=True, highlight=False)


def plain() -> bool:
    """True when nobody watches a terminal: print plain lines instead of live displays."""
    return not console.is_terminal


class Settings:
    """What the user asked for with global flags; read by the code that decides what to show."""

    def __init__(self) -> None:
        self.verbose = False

    @property
    def show_tracebacks(self) -> bool:
        return self.verbose or os.environ.get("JMOSHI_DEBUG", "") not in ("", "0")


settings = Settings()
