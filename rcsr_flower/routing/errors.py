"""The routing library's own errors."""


class ConfigError(ValueError):
    """A run-config value is unknown, of the wrong type, or out of range: one line that
    names the key and what is allowed."""
