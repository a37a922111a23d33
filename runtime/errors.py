"""The one exception type that carries a user-facing message, and the one way it is shown.

Anything raised as `PgError` is bad input or a broken file, not a bug: every entry point (the
`pgbuild` commands and an artifact's own command line) prints its message as a single `error:`
line on stderr and exits with status 2, without a traceback.
"""

import sys

EXIT_REFUSED = 2


class PgError(Exception):
    """A problem the user can fix; the message names the problem and the fix."""


def refuse(message):
    """Show a refusal as every pgbuild entry point does; returns the exit status to use."""
    print(f"error: {message}", file=sys.stderr)
    return EXIT_REFUSED
