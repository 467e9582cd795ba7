"""The package's own errors: a one-line message, a hint, and the exit code the CLI uses."""

from __future__ import annotations


class JMoshiError(Exception):
    """An expected failure: the CLI prints `message` and `hint` and exits with `exit_code`."""

    exit_code = 1

    def __init__(self, message: str, hint: str = "", exit_code: int | None = None, detail: str = ""):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.detail = detail  # more lines for --verbose / JMOSHI_DEBUG=1, e.g. a child's last output
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(JMoshiError):
    """Bad flags or arguments (unknown variant, bad path)."""

    exit_code = 2


class ConfigError(JMoshiError):
    """A variant catalogue that cannot be read."""

    exit_code = 2


class HubError(JMoshiError):
    """The hub could not give us what we asked for."""

    exit_code = 3


class HubUnreachable(HubError):
    """No answer from the hub at all (network, DNS, refused connection): the cache may still serve."""


class CacheError(JMoshiError):
    """The cache is missing files, is corrupt, cannot be written, or the disk is full."""

    exit_code = 4


class PreflightError(JMoshiError):
    """The machine cannot run the server as asked (port taken, no GPU, not enough VRAM)."""

    exit_code = 5


class ServerError(JMoshiError):
    """The child moshi.server stopped on its own."""

    exit_code = 6
