"""Errors a user can fix. The CLI turns these into a one-line ``error: ...`` and exit status 2.

Anything else that escapes is a bug or an environment failure: exit status 1 with the cause.
"""


class UserError(Exception):
    """Bad usage, bad config or bad input. The message names the offending key, file or value."""


class ConfigError(UserError):
    """A config key is unknown, has the wrong type or an out-of-range value."""


class DataError(UserError):
    """A shard, image, caption or embedding that cannot be used (names the file)."""


class WeightsError(UserError):
    """A weights / checkpoint file that does not match what it is loaded into (names the key)."""
