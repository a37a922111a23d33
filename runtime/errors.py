"""The one exception type that carries a user-facing message.

Anything raised as `PgError` is bad input or a broken file, not a bug: command-line entry points
print its message as a single line and exit non-zero, without a traceback.
"""


class PgError(Exception):
    """A problem the user can fix; the message names the problem and the fix."""
