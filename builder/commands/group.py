"""The click group every pgbuild command hangs from."""

import click

from runtime.errors import PgError, refuse


class PgGroup(click.Group):
    """Turns `PgError`, from any command below it, into one `error:` line and exit status 2,
    never a traceback. A subgroup run on its own (as tests do) keeps the same contract."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except PgError as e:
            ctx.exit(refuse(e))
