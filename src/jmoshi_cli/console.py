"""The one console for people: stderr, so stdout carries only results (paths, --json)."""

from __future__ import annotations

from rich.console import Console

# Rich honours NO_COLOR and drops styling when stderr is not a terminal.
console = Console(stderr=True, highlight=False)


def plain() -> bool:
    """True when nobody watches a terminal: print plain lines instead of live displays."""
    return not console.is_terminal
