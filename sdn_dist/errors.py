"""Errors a user can fix. The CLI turns these into a one-line ``error: ...`` and exit status 2.

Anything else that escapes is a bug or an environment failure: exit status 1 with the cause.
``error_line`` is the one place that decides how an error reads, for every entry point.
"""


class UserError(Exception):
    """Bad usage, bad config or bad input. The message names the offending key, file or value."""


class ConfigError(UserError):
    """A config key is unknown, has the wrong type or an out-of-range value."""


class DataError(UserError):
    """A shard, image, caption or embedding that cannot be used (names the file)."""


class WeightsError(UserError):
    """A weights / checkpoint file that does not match what it is loaded into (names the key)."""


def error_line(e: BaseException) -> str:
    """The one line an entry point prints for ``e``: ``error: <message>`` for a UserError (its
    message joined onto one line), ``error: <Type>: <message>`` for anything else. A UserError raised
    inside a Ray task or actor arrives as Ray's dual-class wrapper (a RayTaskError that is also the
    UserError) whose message is the remote traceback: its ``cause`` is the original error."""
    if isinstance(e, UserError):
        while isinstance(getattr(e, "cause", None), UserError) and e.cause is not e:
            e = e.cause
        return "error: " + " ".join(str(e).splitlines())
    return f"error: {type(e).__name__}: " + " ".join(str(e).splitlines())
