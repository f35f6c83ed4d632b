"""The one error type users see for bad input: it names the key, the value and what is allowed."""

from __future__ import annotations

import sys
from typing import Any


class ConfigError(ValueError):
    """Bad user input, raised before any model loads and printed as one line."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r} is not valid: {allowed}")

    def __reduce__(self) -> tuple[type, tuple[str, Any, str]]:
        # Rebuilt from its three fields when it crosses processes (a joblib sweep's worker): the default
        # pickling passes the message alone to __init__, and un-pickling failed.
        return (type(self), (self.key, self.value, self.allowed))


def require(condition: bool, key: str, value: Any, allowed: str) -> None:
    """Raise `ConfigError` unless `condition` holds."""
    if not condition:
        raise ConfigError(key, value, allowed)


def report(error: ConfigError) -> None:
    """The one line a user sees for bad input (the exit status is the caller's: 2)."""
    print(f"kvbench: error: {error}", file=sys.stderr)
