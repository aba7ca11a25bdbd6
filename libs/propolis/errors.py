"""The error taxonomy, translated at each boundary (bus, kernel, API, CLI).

Retry a TemporaryError (I/O, a server away); never retry a PermanentError
(bad input, a schema we cannot read). Wrap with what was being done:
``raise TemporaryError(f"open policy map for endpoint {ep}: {exc}") from exc``.
"""

from __future__ import annotations


class PropolisError(Exception):
    """Base of every error Propolis raises on purpose."""


class TemporaryError(PropolisError):
    """Worth retrying with back-off: the world may change (server restarts, link comes up)."""


class PermanentError(PropolisError):
    """Retrying will not help: the input or the configuration is wrong."""


class ValidationError(PermanentError):
    """Input refused; `field` names the offending field as a dotted path (spec.ingress[0].toPorts)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.reason = message


class SchemaVersionError(PermanentError):
    """A message carries a schema major version this build cannot read."""


class CliError(PropolisError):
    """An error shown to the person as one line, with an exit code."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code
